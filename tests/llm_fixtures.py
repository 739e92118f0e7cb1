"""A tiny, fully offline causal LM and instruction data for the train/eval tests.

The task is boolq-shaped: "is <word> a fruit?" with answer true/false, in the LLM-Adapters
commonsense format. The tokenizer is a word-level one built from the prompts' own words; the
model is a 2-layer Llama with the usual q/k/v/o/gate/up/down projections.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

FRUITS = ["apple", "pear", "plum", "fig", "kiwi", "lime", "grape", "mango"]
OTHERS = ["stone", "chair", "cloud", "river", "brick", "spoon", "shoe", "lamp"]


def boolq_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word = rng.choice(FRUITS + OTHERS)
        answer = "true" if word in FRUITS else "false"
        rows.append({
            "instruction": f"Please answer the following question with true or false, question: is {word} a fruit?\n\nAnswer format: true/false",
            "input": "",
            "output": f"the correct answer is {answer}",
            "answer": answer,
        })
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def build_tiny_llama(folder: Path, seed: int = 0, hidden_size: int = 32) -> Path:
    """Save a tiny LlamaForCausalLM and its word-level tokenizer to ``folder``; return it."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, decoders
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from moslora.train.data import prompt

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    texts = [prompt(r["instruction"]) + r["output"] for r in boolq_rows(200)]
    texts.append(prompt("x", "y") + "answer1 answer2 answer3 answer4 answer5 solution1 solution2 option1 option2 "
                 "ending1 ending2 ending3 ending4 Answer1 Answer2")
    splitter = pre_tokenizers.Whitespace()
    words = sorted({w for t in texts for w, _ in splitter.pre_tokenize_str(t)})
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = splitter
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"],
        pad_token_id=vocab["<pad>"], tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_sharp_tiny_llama(folder: Path) -> Path:
    """:func:`build_tiny_llama` with its output head scaled by 25: logits far from uniform, so the
    options of a choice question score clearly apart and training moves the answers."""
    from transformers import LlamaForCausalLM

    build_tiny_llama(folder)
    model = LlamaForCausalLM.from_pretrained(folder)
    model.lm_head.weight.data *= 25
    model.save_pretrained(folder)
    return folder
