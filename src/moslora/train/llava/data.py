"""LLaVA conversation data: reading and checking the rows, the conversation templates, tokenizing
with the loss on the answers only, and the dataset and collator the Trainer uses.

Data is LLaVA's conversation JSON (a list, or JSON Lines)::

    {"image": "coco/0001.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"}, {"from": "gpt", "value": "A cat."}, ...]}

with ``image`` relative to an image folder. Each row becomes LLaVA-1.5's conversation template
(``<system> USER: <question> ASSISTANT: <answer></s>USER: ...``), or the processor's own chat
template with ``template="chat"``; the loss sees only the answers and their end-of-turn tokens.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moslora.train.data import IGNORE_INDEX
from moslora.train.llava.recipe import TEMPLATE_NAMES

ROLES = ("human", "gpt")  # LLaVA's speaker names: question, answer


@dataclass
class ConversationRows:
    """The good rows of a LLaVA JSON file (image resolved to a path) and the 1-based numbers of the skipped ones."""

    rows: list[dict[str, Any]]
    path: Path
    skipped: list[int] = field(default_factory=list)


def read_conversations(path: str | os.PathLike, image_folder: str | os.PathLike, *, image_token: str = "<image>",
                       skip_bad_rows: bool = False) -> ConversationRows:
    """Read and check every row of a LLaVA conversation file.

    A row needs ``image`` (a file under ``image_folder`` that PIL can open) and ``conversations``:
    turns ``{"from": "human"|"gpt", "value": str}`` starting with a human turn, with at least one
    answer and at most one ``<image>`` (put at the start of the first question when absent, as
    LLaVA does). A bad row is an error naming the file and the row; with ``skip_bad_rows`` it is
    dropped and its number recorded.
    """
    path, image_folder = Path(path), Path(image_folder)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    if not image_folder.is_dir():
        raise FileNotFoundError(f"image folder {str(image_folder)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    data.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {number} is not valid JSON ({e.msg}); expected a JSON list or JSON Lines") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of rows or JSON Lines, got a JSON {type(data).__name__}")
    if not data:
        raise ValueError(f"{path}: no rows")
    rows, skipped = [], []
    for number, row in enumerate(data, start=1):
        problem, clean = _check_row(row, image_folder, image_token)
        if problem is None:
            rows.append(clean)
        elif skip_bad_rows:
            skipped.append(number)
        else:
            raise ValueError(f"{path}: row {number}: {problem} (use --skip-bad-rows to skip such rows)")
    if not rows:
        raise ValueError(f"{path}: all {len(data)} rows are bad (e.g. row {skipped[0]}: {_check_row(data[skipped[0] - 1], image_folder, image_token)[0]})")
    return ConversationRows(rows, path, skipped)


def _check_row(row: Any, image_folder: Path, image_token: str) -> tuple[str | None, dict[str, Any] | None]:
    from PIL import Image, UnidentifiedImageError

    if not isinstance(row, dict):
        return f"is a {type(row).__name__}, not an object", None
    for key in ("image", "conversations"):
        if key not in row:
            return f"missing field {key!r}", None
    if not isinstance(row["image"], str) or not row["image"]:
        return f"field 'image' must be a file name, got {row['image']!r}", None
    turns = row["conversations"]
    if not isinstance(turns, list) or not turns:
        return "field 'conversations' must be a non-empty list of turns", None
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
            return f"conversations[{i}] must be {{'from': 'human'|'gpt', 'value': str}}, got {turn!r}", None
        if turn["from"] != ("human" if i % 2 == 0 else "gpt"):
            return f"conversations[{i}] is from {turn['from']!r}; turns must alternate human, gpt, starting with human", None
    if len(turns) < 2:
        return "no answer ('gpt' turn) to learn from", None
    n_images = sum(turn["value"].count(image_token) for turn in turns)
    if n_images > 1:
        return f"{n_images} {image_token} tokens; LLaVA rows have one image", None
    image = image_folder / row["image"]
    if not image.is_file():
        return f"image {str(image)!r} does not exist", None
    try:
        with Image.open(image) as im:
            im.size  # the header is read: a file PIL cannot identify fails here
    except (UnidentifiedImageError, OSError) as e:
        return f"image {str(image)!r} cannot be read ({e})", None
    turns = [{"role": t["from"], "value": t["value"]} for t in turns]
    if n_images == 0:
        turns[0]["value"] = f"{image_token}\n{turns[0]['value']}"
    return None, {"image": str(image), "turns": turns}


def image_token_count(processor) -> int:
    """How many ``<image>`` tokens the processor expands one image into (probed with a blank image)."""
    from PIL import Image

    size = processor.image_processor.crop_size if getattr(processor.image_processor, "do_center_crop", False) else processor.image_processor.size
    side = max(v for v in dict(size).values()) if size else 32
    ids = processor(text=processor.image_token, images=Image.new("RGB", (side, side)), add_special_tokens=False)["input_ids"][0]
    return sum(1 for i in ids if i == processor.image_token_id)


def llava_v1_segments(processor, turns: list[dict[str, str]], system_prompt: str) -> list[tuple[str, bool]]:
    """LLaVA-1.5's template (``vicuna_v1``) as (text, is_answer) pieces:
    ``<s><system> USER: <question> ASSISTANT: <answer></s>USER: ...``."""
    tokenizer = processor.tokenizer
    pieces = [] if tokenizer.bos_token is None else [(tokenizer.bos_token, False)]
    for i, turn in enumerate(turns):
        if turn["role"] == "human":
            pieces.append((f"{system_prompt + ' ' if i == 0 and system_prompt else ''}USER: {turn['value']} ASSISTANT:", False))
        else:
            pieces.append((f" {turn['value']}{tokenizer.eos_token}", True))
    return pieces


def chat_template_segments(processor, turns: list[dict[str, str]], system_prompt: str) -> list[tuple[str, bool]]:
    """The processor's own chat template as (text, is_answer) pieces: each turn is what rendering
    one more message adds (the generation prompt goes with the question, so the answer piece is
    the answer and its end-of-turn tokens)."""
    image_token = processor.image_token
    messages = [{"role": "system", "content": [{"type": "text", "text": system_prompt}]}] if system_prompt else []
    pieces, previous = [], ""
    for turn in turns:
        content = [{"type": "text", "text": turn["value"].replace(image_token + "\n", "").replace(image_token, "")}]
        if image_token in turn["value"]:
            content.insert(0, {"type": "image"})
        messages.append({"role": "user" if turn["role"] == "human" else "assistant", "content": content})
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=turn["role"] == "human")
        if not text.startswith(previous):
            raise ValueError("the processor's chat template does not render a conversation as a growing prefix; use template='llava-v1'")
        pieces.append((text[len(previous):], turn["role"] == "gpt"))
        previous = text
    return pieces


TEMPLATES = dict(zip(TEMPLATE_NAMES, (llava_v1_segments, chat_template_segments)))


def tokenize_conversation(processor, turns: list[dict[str, str]], *, system_prompt: str, n_image_tokens: int,
                          cutoff_len: int, template: str = "llava-v1") -> dict[str, list[int]] | None:
    """Token ids and labels of one conversation in ``template``, answers only in the labels.

    Returns ``None`` when ``cutoff_len`` would cut into the image tokens or leave no answer token.
    """
    tokenizer, image_token = processor.tokenizer, processor.image_token
    ids: list[int] = []
    labels: list[int] = []
    for text, is_answer in TEMPLATES[template](processor, turns, system_prompt):
        piece = tokenizer(text.replace(image_token, image_token * n_image_tokens), add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if is_answer else [IGNORE_INDEX] * len(piece)
    found = sum(1 for t in ids if t == processor.image_token_id)
    if found != n_image_tokens:
        raise ValueError(f"the tokenizer splits {image_token!r}: {found} image tokens instead of {n_image_tokens}; add it as a special token")
    ids, labels = ids[:cutoff_len], labels[:cutoff_len]
    if sum(1 for t in ids if t == processor.image_token_id) != n_image_tokens or all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": ids, "labels": labels}


class ConversationDataset(torch.utils.data.Dataset):
    """Rows tokenized up front (so rows cut away by ``cutoff_len`` are known and counted); images
    are read and processed when a row is fetched."""

    def __init__(self, processor, rows: list[dict[str, Any]], *, system_prompt: str, cutoff_len: int, template: str = "llava-v1") -> None:
        self.processor = processor
        n = image_token_count(processor)
        self.examples, self.dropped = [], 0
        for row in rows:
            tokens = tokenize_conversation(processor, row["turns"], system_prompt=system_prompt, n_image_tokens=n, cutoff_len=cutoff_len,
                                           template=template)
            if tokens is None:
                self.dropped += 1
            else:
                self.examples.append({**tokens, "image": row["image"]})

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from PIL import Image

        example = self.examples[index]
        with Image.open(example["image"]) as im:
            pixels = self.processor.image_processor(im.convert("RGB"), return_tensors="pt")["pixel_values"][0]
        return {"input_ids": example["input_ids"], "labels": example["labels"], "pixel_values": pixels}


@dataclass
class ConversationCollator:
    """Right-pads ids (pad token), labels (ignored) and the attention mask; stacks the images."""

    pad_token_id: int

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n] = torch.tensor(b["input_ids"])
            labels[i, :n] = torch.tensor(b["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": torch.stack([b["pixel_values"] for b in batch])}
