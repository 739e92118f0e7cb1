"""Multiple-choice questions for `moslora compare`: a question as the paper's label format and as
choice text, choice scoring against a hand computation on a tiny Llama, and the frozen-bottom
cache of a causal LM (same loss, same scores as the whole model)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import moslora

from moslora.compare.instruction import InstructionData, InstructionTask, TopOfCausalLM
from moslora.compare.sources import choice_row, label_row
from moslora.data.olmo import Question
from moslora.eval.evaluate import continuation_logprobs, evaluate
from moslora.train.data import prompt


def test_a_question_in_the_label_format_and_as_choice_text():
    q = Question("socialiqa/train/7", "Sasha made new laws. What will patients want to do next?", ["Write new laws", "Get petitions signed", "Live longer"], 1)
    assert label_row(q) == {
        "instruction": "Please choose the correct answer to the question: Sasha made new laws. What will patients want to do next?\n\n"
        "Answer1: Write new laws Answer2: Get petitions signed Answer3: Live longer\n\nAnswer format: answer1/answer2/answer3",
        "input": "",
        "output": "the correct answer is answer2",
        "answer": "answer2",
    }
    assert choice_row(q) == {  # the options are not in the prompt: the row carries them for scoring
        "instruction": "Please answer the question: Sasha made new laws. What will patients want to do next?",
        "input": "",
        "output": "Get petitions signed",
        "answer": "Get petitions signed",
        "options": ["Write new laws", "Get petitions signed", "Live longer"],
    }
    from moslora.eval.tasks import choices, extract_answer

    assert extract_answer("social_i_qa", label_row(q)["output"]) == "answer2"
    assert choices("social_i_qa", label_row(q)["instruction"]) == ["answer1", "answer2", "answer3"]


# --------------------------------------------------------------------------------------------
# Choice scoring and the causal-LM cache on a tiny Llama


def _choice_rows(n: int, seed: int) -> list[dict]:
    from llm_fixtures import boolq_rows

    # Options of different lengths (1 and 4 tokens), so the length normalisation matters.
    long = "is apple a fruit"
    rows = []
    for row in boolq_rows(n, seed):
        options = ["true", long] if len(rows) % 2 else [long, "false"]
        rows.append({**row, "output": options[0], "answer": options[0], "options": options})
    return rows


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    from llm_fixtures import build_sharp_tiny_llama

    return build_sharp_tiny_llama(tmp_path_factory.mktemp("tiny-llama-choice"))


def test_choice_scoring_is_the_logprob_per_character_by_hand(tiny_llama):
    """Each option's summed log-probability over its own tokens, divided by its length in
    characters; no data set is needed (choice scoring reads the options)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    model, tokenizer = LlamaForCausalLM.from_pretrained(tiny_llama).eval(), AutoTokenizer.from_pretrained(tiny_llama)
    rows = _choice_rows(6, seed=3)
    result = evaluate(model, tokenizer, rows, None, scoring="choice", batch_size=4)
    for row, example in zip(rows, result["examples"]):
        context = prompt(row["instruction"])
        n_context = len(tokenizer(context)["input_ids"])
        by_hand = {}
        for option in row["options"]:
            ids = tokenizer(context + option)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
            tokens = range(n_context, len(ids))  # the option's tokens; token t is predicted at t − 1
            by_hand[option] = sum(float(logp[t - 1, ids[t]]) for t in tokens) / len(option)
        assert len(tokenizer(context + row["options"][0])["input_ids"]) != len(tokenizer(context + row["options"][1])["input_ids"])
        for option, score in example["prediction"].items():
            assert score == pytest.approx(by_hand[option], abs=1e-5)
        assert example["extracted"] == max(row["options"], key=by_hand.get)
        assert example["correct"] == (example["extracted"] == row["answer"])
    assert result["accuracy"] == sum(e["correct"] for e in result["examples"]) / 6


def test_choice_scoring_refuses_rows_without_their_answer_among_the_options(tiny_llama):
    from transformers import AutoTokenizer, LlamaForCausalLM

    model, tokenizer = LlamaForCausalLM.from_pretrained(tiny_llama), AutoTokenizer.from_pretrained(tiny_llama)
    rows = _choice_rows(2, seed=0)
    rows[1] = {**rows[1], "answer": "maybe"}
    with pytest.raises(ValueError, match="row 2: its answer 'maybe' is not one of its options"):
        evaluate(model, tokenizer, rows, "boolq", scoring="choice")
    with pytest.raises(ValueError, match="field 'test': row 1: choice scoring needs 'options'"):
        InstructionTask(name="t", model=str(tiny_llama), dataset="boolq", train=rows, validation=[], test=[{**rows[0], "options": None}],
                        scoring="choice")


def _task(tiny_llama: Path, frozen: int) -> InstructionTask:
    return InstructionTask(name="tiny-choice", model=str(tiny_llama), dataset="boolq", train=_choice_rows(16, 0),
                           validation=_choice_rows(4, 1), test=_choice_rows(6, 2), steps=3, batch_size=4, max_length=64,
                           scoring="choice", frozen_layers=frozen, target_modules=r"model\.layers\.1\.(self_attn\.(q|k|v)_proj|mlp\.(up|down)_proj)")


def _perturbed(prepared: InstructionData) -> torch.nn.Module:
    import moslora

    model = prepared.build("moslora", seed=0, r=4)
    with torch.no_grad():
        for _, layer in moslora.adapter_layers(model):
            layer.lora_B.normal_(std=0.5)
    return model.eval()


def test_the_cached_bottom_gives_the_whole_models_loss_and_scores(tiny_llama):
    # frozen_layers=1: layer 0 runs once per row; the top fed its cached output must give the whole
    # model's training loss (on the response tokens) and the same choice scores as evaluate().
    whole, cached = InstructionData(_task(tiny_llama, 0)), InstructionData(_task(tiny_llama, 1))
    model = _perturbed(cached)
    top = TopOfCausalLM(model, 1)
    with torch.no_grad():
        expected = model(**whole.collator()(whole.train[:4])).loss
        got = top(**cached.collator()(cached.examples([0, 1, 2, 3])))["loss"]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)

    rows = cached.task.test
    pairs = [(prompt(r["instruction"]), option) for r in rows for option in r["options"]]
    by_evaluate = continuation_logprobs(model, cached.tokenizer, [c for c, _ in pairs], [x for _, x in pairs])
    with torch.no_grad():
        from_cache = top.continuation_scores(cached.scoring_cache["test"])
    torch.testing.assert_close(torch.tensor(from_cache), torch.tensor(by_evaluate), rtol=1e-5, atol=1e-5)
    scored = cached.score(model, "test")
    assert scored["answers"] == [e["extracted"] for e in evaluate(model, cached.tokenizer, rows, "boolq", scoring="choice")["examples"]]


def test_plain_target_names_with_frozen_layers_adapt_the_layers_above_only(tiny_llama):
    task = replace(_task(tiny_llama, 1), dataset=None, target_modules=["q_proj", "v_proj", "down_proj"])
    model = InstructionData(task).build("moslora", seed=0, r=4)
    assert [name for name, _ in moslora.adapter_layers(model)] == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.1.mlp.down_proj"]


def test_a_task_reaching_into_the_frozen_bottom_is_refused_before_the_model_loads(tiny_llama, monkeypatch):
    import moslora.train.model

    def no_load(*args, **kwargs):
        raise AssertionError("the weights were loaded before the task was checked")

    monkeypatch.setattr(moslora.train.model, "load_model", no_load)
    with pytest.raises(ValueError, match=r"adapt 1 module\(s\) below frozen_layers=1, whose output is cached \(first: model.layers.0.self_attn.q_proj\)"):
        InstructionData(replace(_task(tiny_llama, 1), target_modules=r"model\.layers\.\d\.self_attn\.q_proj"))
    with pytest.raises(ValueError, match="target_modules \\['qproj'\\] matched no module"):
        InstructionData(replace(_task(tiny_llama, 1), target_modules=["qproj"]))
    with pytest.raises(ValueError, match="frozen_layers=2 leaves no layer to adapt: the model has 2"):
        InstructionData(replace(_task(tiny_llama, 2), target_modules=["q_proj"]))


def test_only_the_training_rows_a_run_uses_go_through_the_frozen_bottom(tiny_llama, monkeypatch):
    import moslora.compare.instruction as instruction

    seen = []
    real = instruction.bottom_states
    monkeypatch.setattr(instruction, "bottom_states", lambda model, k, rows, **kw: seen.append(len(rows)) or real(model, k, rows, **kw))
    prepared = InstructionData(_task(tiny_llama, 1))
    assert seen == [4 * 2, 6 * 2] and len(prepared.train) == 16  # the scoring splits' options; no training row yet
    first = prepared.examples([3, 5, 3])
    again = prepared.examples([5, 7])
    assert seen == [8, 12, 2, 1]  # then rows 3 and 5, then row 7 alone
    assert first[1] is again[0] and first[0] is first[2]
    whole = InstructionData(_task(tiny_llama, 0))
    assert prepared.examples([7])[0]["labels"] == whole.examples([7])[0]["labels"]


def test_a_task_file_with_plain_names_and_frozen_layers_runs_and_records_what_it_did(tiny_llama, tmp_path):
    """The shape of docs/compare.md's task file: choice scoring without a data set, the bottom layer
    cached, targets named plainly; the adapters sit in the layer above only."""
    from llm_fixtures import write_jsonl

    from moslora.cli.main import main

    for name, (n, seed) in {"train": (16, 0), "validation": (4, 1), "test": (6, 2)}.items():
        write_jsonl(tmp_path / f"{name}.jsonl", _choice_rows(n, seed))
    (tmp_path / "task.yaml").write_text(
        f"kind: instruction\nmodel: {tiny_llama}\ntrain: train.jsonl\nvalidation: validation.jsonl\ntest: test.jsonl\n"
        "scoring: choice\nfrozen_layers: 1\ntarget_modules: [q_proj, v_proj, down_proj]\nsteps: 2\nbatch_size: 4\n"
        "max_length: 64\nlog_every: 1\n")
    out = tmp_path / "out"
    assert main(["compare", "--task", str(tmp_path / "task.yaml"), "--methods", "lora,moslora", "--seeds", "1", "--r", "4",
                 "--lrs", "1e-2", "--output", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert (results["task"]["dataset"], results["task"]["extraction"], results["task"]["choice_normalization"]) == (None, None, "character")
    assert results["task"]["frozen_layers"] == 1 and not Path(results["task"]["model"]).is_absolute()
    for run in results["runs"]:
        assert run["config"]["exclude_modules"] == r"model\.(embed_tokens|layers\.(0))(\..*)?"
        assert run["curve"]["step"] == [1, 2]
    assert "log-probability per character" in (out / "results.md").read_text()
