"""`moslora eval`: the paper's answer extraction, batched generation, log-likelihood scoring, results file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import moslora
from llm_fixtures import boolq_rows, build_tiny_llama, write_jsonl
from moslora.eval import TASKS, choices, evaluate, extract_answer
from moslora.eval.evaluate import continuation_logprobs, generate_responses
from moslora.train.data import prompt


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), seed=3)


@pytest.fixture(scope="module")
def lm(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny).eval(), AutoTokenizer.from_pretrained(tiny)


# ----- extraction (LLM-Adapters commonsense_evaluate.py) --------------------------------------------
@pytest.mark.parametrize(
    "dataset, text, expected",
    [
        ("boolq", "the correct answer is true", "true"),
        ("boolq", "false, though some say true", "false"),  # the first match wins
        ("boolq", "True", ""),  # case-sensitive, as the paper's regex
        ("boolq", "it is untrue", "true"),  # a bare substring match, as the paper's regex
        ("piqa", "the correct answer is solution2", "solution2"),
        ("social_i_qa", "the correct answer is answer3", "answer3"),
        ("ARC-Challenge", "answer5 is right", "answer5"),
        ("ARC-Easy", "I pick answer1", "answer1"),
        ("openbookqa", "answer4", "answer4"),
        ("hellaswag", "the correct answer is ending4", "ending4"),
        ("hellaswag", "ending5", ""),
        ("winogrande", "option2 then option1", "option2"),
        ("winogrande", "no idea", ""),
    ],
)
def test_prediction_is_the_first_label_match(dataset, text, expected):
    assert extract_answer(dataset, text) == expected


def test_the_eight_datasets_of_the_paper():
    assert sorted(TASKS) == sorted(["boolq", "piqa", "social_i_qa", "ARC-Challenge", "ARC-Easy", "openbookqa", "hellaswag", "winogrande"])
    with pytest.raises(ValueError, match="unknown dataset 'mmlu'"):
        extract_answer("mmlu", "true")


def test_options_come_from_the_answer_format_line():
    assert choices("ARC-Challenge", "Q?\n\nAnswer format: answer1/answer2/answer3/answer4/answer5") == [f"answer{i}" for i in range(1, 6)]
    assert choices("ARC-Easy", "Q?\n\nAnswer format: answer1/answer2/answer3") == ["answer1", "answer2", "answer3"]
    assert choices("social_i_qa", "Q? no format line") == ["answer1", "answer2", "answer3"]
    assert choices("boolq", "Answer format: true/false") == ["true", "false"]


# ----- scoring mechanics against unbatched references ------------------------------------------------
def test_loglik_equals_a_token_by_token_reference(lm):
    model, tok = lm
    context, continuation = prompt("is apple a fruit?") + "the correct answer is", " true"
    ids = tok(context + continuation, return_tensors="pt")["input_ids"]
    n_ctx = len(tok(context)["input_ids"])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    reference = sum(logp[t - 1, ids[0, t]].item() for t in range(n_ctx, ids.shape[1]))
    # batched with a longer neighbour, so this row is right-padded
    got = continuation_logprobs(model, tok, [context, context + " and so"], [continuation, " false answer1 answer2"], batch_size=2)
    assert got[0] == pytest.approx(reference, abs=1e-4)
    assert n_ctx < ids.shape[1]


def test_batched_left_padded_generation_equals_one_at_a_time(lm):
    model, tok = lm
    prompts = [prompt(r["instruction"]) for r in boolq_rows(3)] + [prompt("is fig a fruit? " * 3)]
    batched = generate_responses(model, tok, prompts, batch_size=4, max_new_tokens=6)
    alone = [generate_responses(model, tok, [p], batch_size=1, max_new_tokens=6)[0] for p in prompts]
    assert batched == alone


# ----- evaluate and the results file ----------------------------------------------------------------
def test_results_have_accuracy_counts_and_every_example(lm, tmp_path):
    model, tok = lm
    rows = boolq_rows(6, seed=2)
    for scoring in ("generate", "loglik"):
        tok.padding_side = "right" if scoring == "generate" else "left"  # the other side from the one it scores with
        before = tok.padding_side
        res = evaluate(model, tok, rows, "boolq", scoring=scoring, batch_size=4, max_new_tokens=4)
        assert tok.padding_side == before  # left as the caller had it
        assert res["total"] == 6 and len(res["examples"]) == 6
        assert res["correct"] == sum(e["extracted"] == r["answer"] for e, r in zip(res["examples"], rows))
        assert res["accuracy"] == pytest.approx(res["correct"] / 6)
        assert all({"prediction", "extracted", "answer", "correct"} <= e.keys() for e in res["examples"])
    assert set(res["examples"][0]["prediction"]) == {"true", "false"}  # loglik: one score per option
    assert res["no_answer"] == 0


def test_cli_eval_with_adapter_writes_and_merges_results(tiny, lm, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from moslora.cli.main import main

    torch.manual_seed(0)
    adapted = moslora.inject(AutoModelForCausalLM.from_pretrained(tiny), moslora.MoSLoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for _, layer in moslora.adapter_layers(adapted):
            layer.lora_B.normal_(0, 0.5)
    moslora.save_adapter(adapted, tmp_path / "adapter")
    data = write_jsonl(tmp_path / "test.jsonl", boolq_rows(5, seed=4))
    out = tmp_path / "results.json"
    common = ["eval", "--model", str(tiny), "--adapter", str(tmp_path / "adapter"), "--data", str(data), "--output", str(out), "--batch-size", "2"]
    assert main(common + ["--dataset", "boolq", "--scoring", "loglik"]) == 0
    assert "boolq: accuracy" in capsys.readouterr().out
    assert main(common + ["--dataset", "piqa", "--max-new-tokens", "3"]) == 0
    results = json.loads(out.read_text())
    assert set(results["datasets"]) == {"boolq", "piqa"} and results["adapter"] == str(tmp_path / "adapter")
    expected = evaluate(adapted.eval(), lm[1], data, "boolq", scoring="loglik", batch_size=2)
    for got, want in zip(results["datasets"]["boolq"]["examples"], expected["examples"], strict=True):
        assert got["prediction"] == pytest.approx(want["prediction"], abs=1e-4)
    assert results["average_accuracy"] == pytest.approx((results["datasets"]["boolq"]["accuracy"] + results["datasets"]["piqa"]["accuracy"]) / 2)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "q"}])
    assert main(["eval", "--model", str(tiny), "--data", str(bad), "--dataset", "boolq"]) == 2
    assert "row 1: missing field 'answer'" in capsys.readouterr().err
