"""BIG-bench task files for the built-in ``siqa``, ``bbq`` and ``cifar10`` tasks: fetched once from
the package index, checked by SHA-256, read from a local cache ever after; and the reader of its
multiple-choice questions (:func:`read_questions`).

BIG-bench ships its task data only in its source distribution on PyPI (``bigbench==1.0.0``, a
358 MB ``.tar.gz``; installing it is not needed and takes minutes and 1.8 GB). :func:`fetch`
downloads that archive once (or takes one you already have), keeps only the task files listed in
:data:`FILES` (44 MB) in :func:`cache_dir`, and deletes the archive. Every read checks the file's
SHA-256, so a truncated, edited or different file is refused by name instead of giving other
numbers. Nothing is fetched from a model or data-set hub, and nothing at all while a task runs:
a missing file is an error that says the one command that fetches it.

(``pip download --no-deps --no-binary :all: bigbench==1.0.0`` gets the same archive with pip < 26;
pip 26 refuses it because its metadata names a direct-URL dependency. ``moslora data fetch
--sdist bigbench-1.0.0.tar.gz`` takes an archive fetched that way.)
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

SDIST = "bigbench-1.0.0.tar.gz"
SDIST_URL = "https://files.pythonhosted.org/packages/95/f8/c019b3579df548a04cac12342cfcb878e50ddf6cfcd7fddba8cfc721c157/" + SDIST
SDIST_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
SDIST_SIZE = 358_249_635
_MEMBER_ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks/"
# The task files the built-in tasks read (paths under benchmark_tasks/) and their SHA-256.
FILES = {
    "social_iqa/task.json": "edc9f568b70ae6d4af0783764dbe4e4f18aa1242c675a93f534338d73a565348",
    "cifar10_classification/base64/task.json": "226298409875f5b93ccda063863181f88723d39bac7eeef28a79843ae0aace31",
    "bbq_lite_json/age_ambig/task.json": "833f606ed66caaae482c4baa38a3c760287d7f2661551853d34a333f6b0843b7",
    "bbq_lite_json/age_disambig/task.json": "10270046a3ecce05096a8408c32df9ef9d2b6ae0f71ea5251255bb2a25b50e0e",
    "bbq_lite_json/disability_status_ambig/task.json": "a0d02ca018cbcaeefa93f28edb0c176d02072c9e1e254f92182fe04003287ff2",
    "bbq_lite_json/disability_status_disambig/task.json": "652fd1fcc8b390e3b5a577b362ab5fad913c053f956142bc134d1de52cf2776a",
    "bbq_lite_json/gender_identity_ambig/task.json": "aee50f35fe3c72a9e3da4a9f0c761b99faba3e9a1b833b6a038ab0ce8943b413",
    "bbq_lite_json/gender_identity_disambig/task.json": "503781b8fb65e15246e9683d3e3f5c5e3cd434c461c1291c3b91c96ce76e313d",
    "bbq_lite_json/nationality_ambig/task.json": "01193cc5cf47b5e50e98e45feab87717f99fb08ac28d32039b0077fbf7aaae6b",
    "bbq_lite_json/nationality_disambig/task.json": "886e57ba9e0c4cfd2e54419f97d789b1962726bf771e9159a1c709d8983a64a1",
    "bbq_lite_json/physical_appearance_ambig/task.json": "bac63539afa6563aa8fafe607532cc3cd2847ed24cfe2b4ab5f054235a19e1d0",
    "bbq_lite_json/physical_appearance_disambig/task.json": "fcb76cee96202782fd55697c71267bf209af4659e5d449447a26fc6fbafbdc3c",
    "bbq_lite_json/race_ethnicity_ambig/task.json": "d1ea7ec8e6719474dca07fcac916266712ded079abda99f476a04f0be012bdab",
    "bbq_lite_json/race_ethnicity_disambig/task.json": "69c321f3b44ceff245eacc7daedddfc8578baf892803edcea553a98269950747",
    "bbq_lite_json/religion_ambig/task.json": "8efe7d4875d6958a9d61345589738298326b1016f86c23f700a296ca3827f3db",
    "bbq_lite_json/religion_disambig/task.json": "1594d036ee637726bfa1e3842385938bdb0ec3468efa33067efb5e0bf6a45bcb",
    "bbq_lite_json/ses_ambig/task.json": "b5c1f9248dd7c9479b17aa12439616663269aba597dd8dbced67cd4e46689c0f",
    "bbq_lite_json/ses_disambig/task.json": "695f34dd80bce43ab11dbe7d8d527609efc6caaf2442d4a4f93415a8fcfc8b34",
    "bbq_lite_json/sexual_orientation_ambig/task.json": "7683eea18a08b11c27e7eaf4ee780d5624e676e74e0f778e1618e100c397a7e0",
    "bbq_lite_json/sexual_orientation_disambig/task.json": "ab57d95bd448779b6e9bdd422a5745f1236c7934a80ac7fced0ad8dc9f9d5a5b",
}
FETCH_COMMAND = "moslora data fetch"
CACHE_ENV = "MOSLORA_DATA_DIR"


class DataMissingError(FileNotFoundError):
    """A task file is not in the cache (the message says how to fetch it)."""


def cache_dir() -> Path:
    """``$MOSLORA_DATA_DIR`` if set, else ``$XDG_CACHE_HOME/moslora`` (``~/.cache/moslora``), plus ``bigbench-1.0.0``."""
    root = os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moslora"
    return Path(root) / "bigbench-1.0.0"


def sha256(path: Path, on_bytes: Callable[[int], None] | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
    return digest.hexdigest()


def task_file(name: str, cache: Path | None = None) -> Path:
    """The cached, checksum-verified path of BIG-bench task file ``name`` (a key of :data:`FILES`)."""
    if name not in FILES:
        raise ValueError(f"unknown BIG-bench task file {name!r}; known: {sorted(FILES)}")
    path = (cache or cache_dir()) / name
    if not path.is_file():
        raise DataMissingError(
            f"BIG-bench task file {path} is missing. Fetch it once with:\n    {FETCH_COMMAND}\n"
            f"(downloads {SDIST}, 358 MB, from PyPI and keeps only the task files, 44 MB; "
            f"set {CACHE_ENV} to keep them elsewhere)"
        )
    _check(path, FILES[name])
    return path


def _check(path: Path, expected: str) -> None:
    got = sha256(path)
    if got != expected:
        raise ValueError(
            f"{path} does not match its checksum (SHA-256 {got}, expected {expected}): it is corrupt or not "
            f"BIG-bench 1.0.0's file. Delete it and run: {FETCH_COMMAND}"
        )


def missing(cache: Path | None = None) -> list[str]:
    """The task files not yet in the cache (present but corrupt files count as present: reading refuses them)."""
    return [name for name in FILES if not ((cache or cache_dir()) / name).is_file()]


def fetch(sdist: str | os.PathLike | None = None, cache: Path | None = None, *, progress: bool = True) -> Path:
    """Put every file of :data:`FILES` into the cache, verified. Files already there and intact are
    kept. The archive is ``sdist`` if given (checked against :data:`SDIST_SHA256`), else downloaded
    from PyPI into a temporary file next to the cache and deleted afterwards. Returns the cache."""
    cache = cache or cache_dir()
    todo = []
    for name, expected in FILES.items():
        path = cache / name
        if not path.is_file() or sha256(path) != expected:
            todo.append(name)
    if not todo:
        return cache
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".fetch-") as tmp:
        archive = Path(sdist) if sdist is not None else _download(Path(tmp) / SDIST, progress)
        if sdist is not None:
            if not archive.is_file():
                raise FileNotFoundError(f"--sdist {archive} does not exist")
            if sha256(archive) != SDIST_SHA256:
                raise ValueError(f"{archive} is not {SDIST} from PyPI: its SHA-256 differs from {SDIST_SHA256}")
        _extract(archive, todo, cache, Path(tmp))
    return cache


def _download(target: Path, progress: bool) -> Path:
    from tqdm.auto import tqdm

    bar = tqdm(total=SDIST_SIZE, unit="B", unit_scale=True, desc=f"downloading {SDIST}", disable=not progress)
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(SDIST_URL, timeout=60) as response, open(target, "wb") as f:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
    except OSError as e:
        raise ConnectionError(
            f"could not download {SDIST_URL} ({e}). With network access, run again: {FETCH_COMMAND}\n"
            f"Or fetch the archive another way (e.g. curl -LO {SDIST_URL}) and run: {FETCH_COMMAND} --sdist {SDIST}"
        ) from None
    finally:
        bar.close()
    if digest.hexdigest() != SDIST_SHA256:
        raise ValueError(f"the download of {SDIST_URL} does not match its SHA-256 {SDIST_SHA256}; run {FETCH_COMMAND} again")
    return target


def _extract(archive: Path, names: list[str], cache: Path, tmp: Path) -> None:
    """Extract ``names`` from the archive, verify each, then move each into place (whole files only)."""
    members = {_MEMBER_ROOT + name: name for name in names}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            name = members.pop(member.name, None)
            if name is None or not member.isfile():
                continue
            staged = tmp / name.replace("/", "__")
            with tar.extractfile(member) as src, open(staged, "wb") as dst:
                shutil.copyfileobj(src, dst)
            if sha256(staged) != FILES[name]:
                raise ValueError(f"{archive}: {member.name} does not match its SHA-256 {FILES[name]}")
            (cache / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, cache / name)
            if not members:
                break
    if members:
        raise ValueError(f"{archive} lacks {sorted(members)}: is it {SDIST}?")


@dataclass(frozen=True)
class Question:
    """One multiple-choice question: its text (whitespace collapsed), its options, the gold option's index."""

    question: str
    options: list[str]
    gold: int


def read_questions(path: str | Path) -> list[Question]:
    """A BIG-bench multiple-choice ``task.json`` (``social_iqa``, ``bbq_lite_json/…``): ``examples``
    of ``{"input", "target_scores"}`` with one option scored 1. Errors name the file and the example."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    questions = []
    for i, example in enumerate(data.get("examples", [])):
        scores = example.get("target_scores")
        if not isinstance(scores, dict) or len(scores) < 2 or sorted(scores.values()) != [0] * (len(scores) - 1) + [1]:
            raise ValueError(f"{path}: example {i + 1} must have 'target_scores' with exactly one option scored 1, got {scores!r}")
        options = [option.strip() for option in scores]
        questions.append(Question(" ".join(example["input"].split()), options, list(scores.values()).index(1)))
    if not questions:
        raise ValueError(f"{path}: no examples")
    return questions


def choice_row(q: Question) -> dict[str, Any]:
    """An instruction row with the options as text: the question alone (the options are not listed: a
    model that sees them learns to copy any of them, which raises every option's likelihood alike),
    the gold option's text as the response, and the options carried by the row for choice scoring."""
    return {
        "instruction": f"Please answer the question: {q.question}",
        "input": "",
        "output": q.options[q.gold],
        "answer": q.options[q.gold],
        "options": list(q.options),
    }


def fixed_split(questions: list[Question], sizes: dict[str, int]) -> dict[str, list[Question]]:
    """A built-in task's split, made once: the questions shuffled with ``random.Random(0)``, the
    first ``sizes["test"]`` test, the next ``sizes["validation"]`` validation, the rest train."""
    order = list(range(len(questions)))
    random.Random(0).shuffle(order)
    test, validation = sizes["test"], sizes["validation"]
    pick = lambda part: [questions[i] for i in part]  # noqa: E731
    return {"test": pick(order[:test]), "validation": pick(order[test : test + validation]), "train": pick(order[test + validation :])}
