"""SIQA for `moslora compare`: BIG-bench rows → the paper's label format and the choice-text
format, choice scoring against a hand computation on a tiny Llama, the frozen-bottom cache of a
causal LM (same loss, same scores as the whole model), and the built-in tasks on the real data
(skipped when the BIG-bench cache is absent: `moslora data fetch`, which `make test` runs)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import moslora

from moslora.compare import bigbench
from moslora.compare.instruction import InstructionData, InstructionTask, TopOfCausalLM
from moslora.compare.siqa import Question, choice_row, label_row, read_questions, siqa_splits
from moslora.eval.evaluate import continuation_logprobs, evaluate
from moslora.train.data import prompt

needs_siqa = pytest.mark.skipif(
    "social_iqa/task.json" in bigbench.missing(),
    reason=f"BIG-bench cache absent ({bigbench.cache_dir()}); run `{bigbench.FETCH_COMMAND}` (make test does)",
)


def test_bigbench_rows_become_questions(tmp_path):
    path = tmp_path / "task.json"
    path.write_text(json.dumps({"examples": [
        {"input": "Tracy didn't go home that evening.  What does Tracy need to do before this? ",
         "target_scores": {"Make a new plan": 0, "Go home and see Riley": 0, " Find somewhere to go": 1}},
        {"input": "Remy gave birth. How would you describe Remy? ", "target_scores": {"Happy": 1, "A new parent": 0}},
    ]}))
    first, second = read_questions(path)
    assert first == Question("Tracy didn't go home that evening. What does Tracy need to do before this?",
                             ["Make a new plan", "Go home and see Riley", "Find somewhere to go"], 2)
    assert second.options == ["Happy", "A new parent"] and second.gold == 0
    path.write_text(json.dumps({"examples": [{"input": "q", "target_scores": {"a": 1, "b": 1}}]}))
    with pytest.raises(ValueError, match=r"task.json: example 1 must have 'target_scores' with exactly one option scored 1"):
        read_questions(path)


def test_a_question_in_the_label_format_and_as_choice_text():
    q = Question("Sasha made new laws. What will patients want to do next?", ["Write new laws", "Get petitions signed", "Live longer"], 1)
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


def test_the_split_is_fixed_and_disjoint():
    questions = [Question(f"q{i}", ["a", "b", "c"], i % 3) for i in range(700)]
    splits = siqa_splits(questions)
    assert [len(splits[k]) for k in ("train", "validation", "test")] == [100, 150, 450]
    ids = {k: {q.question for q in v} for k, v in splits.items()}
    assert not (ids["train"] & ids["validation"]) and not (ids["train"] & ids["test"]) and not (ids["validation"] & ids["test"])
    assert siqa_splits(questions) == splits  # made once, the same every time


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
    from llm_fixtures import build_tiny_llama
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("tiny-llama-choice")
    build_tiny_llama(root)
    model = LlamaForCausalLM.from_pretrained(root)
    model.lm_head.weight.data *= 25  # logits far from uniform, so the options' scores differ clearly
    model.save_pretrained(root)
    return root


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


# --------------------------------------------------------------------------------------------
# The built-in tasks on the real data


@needs_siqa
def test_builtin_siqa_tasks_ask_the_fixed_split():
    from moslora.compare.siqa import siqa_labels_task, siqa_task

    task, labels = siqa_task(), siqa_labels_task()
    assert (len(task.train), len(task.validation), len(task.test)) == (1354, 150, 450)
    assert task.scoring == "choice" and labels.scoring == "generate" and task.frozen_layers == 26
    assert task.model.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and Path(task.model).is_file()
    for choice, label in zip(task.test, labels.test):
        question = choice["instruction"].removeprefix("Please answer the question: ")
        assert label["instruction"].startswith(f"Please choose the correct answer to the question: {question}\n\nAnswer1: ")
        assert label["answer"] == f"answer{choice['options'].index(choice['answer']) + 1}"
    assert sum(len(r["options"]) == 2 for r in task.train + task.validation + task.test) == 4
    assert task.chance() == pytest.approx(sum(1 / len(r["options"]) for r in task.test) / 450)
    quick = task.quick()
    assert (quick.steps, len(quick.train), len(quick.validation), len(quick.test)) == (40, 320, 0, 150)


@needs_siqa
@pytest.mark.slow
def test_siqa_end_to_end_on_a_few_rows(tmp_path):
    from moslora.compare.report import save
    from moslora.compare.runner import run_comparison
    from moslora.compare.siqa import siqa_task

    task = siqa_task()
    task = replace(task, steps=2, warmup_steps=0, log_every=1, train=task.train[:16], validation=task.validation[:3], test=task.test[:4])
    results = run_comparison(task, methods=["lora", "moslora"], seeds=1, r=4, lrs=[1e-3], progress=False)
    assert set(results["untrained"]) == {"test"} and 0 <= results["untrained"]["test"] <= 1
    runs = results["runs"]
    assert [(r["method"], r["seed"]) for r in runs] == [("lora", 0), ("moslora", 0)]
    assert all(len(r["answers"]) == 4 and set(r["answers"]) <= {o for row in task.test for o in row["options"]} for r in runs)
    assert runs[0]["curve"]["step"] == [1, 2] and all(loss > 0 for loss in runs[0]["curve"]["loss"])
    paths = save(results, tmp_path, "moslora compare --task siqa")
    assert "Before training: chance" in paths["markdown"].read_text()


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


needs_bbq = pytest.mark.skipif(bool(set(bigbench.missing()) & {f for f in bigbench.FILES if f.startswith("bbq_lite_json/")}),
                               reason="the BIG-bench cache lacks bbq_lite_json: moslora data fetch")


@needs_bbq
def test_the_bbq_task_pools_the_18_subtasks_into_a_fixed_disjoint_split():
    from moslora.compare.bbq import BBQ_FILES, bbq_questions, bbq_splits, bbq_task

    assert len(BBQ_FILES) == 18
    questions = bbq_questions()
    assert len(questions) == 16076 and all(len(q.options) == 3 for q in questions)
    task = bbq_task()
    assert (len(task.train), len(task.validation), len(task.test)) == (15776, 100, 200)
    assert (task.scoring, task.dataset, task.frozen_layers, task.precision) == ("choice", None, 22, "bf16")
    assert task.target_modules == ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
    assert task.exclude_modules.startswith(r"model\.(embed_tokens|layers\.(0|1|")
    splits = bbq_splits(questions)
    texts = {name: {(q.question, tuple(q.options)) for q in part} for name, part in splits.items()}
    assert not texts["test"] & texts["train"] and not texts["validation"] & texts["train"]  # no test question is trained on
    assert [r["instruction"] for r in task.test] == [f"Please answer the question: {q.question}" for q in splits["test"]]
    assert all(r["answer"] in r["options"] and r["output"] == r["answer"] for r in task.test + task.train[:100])
    assert task.chance() == pytest.approx(1 / 3)
    quick = task.quick()
    assert (task.steps, quick.steps, len(quick.train), len(quick.validation), len(quick.test), quick.quick_lr) == (30, 30, 240, 0, 150, 3e-3)
