"""BIG-bench task files for the built-in ``siqa`` and ``cifar10`` tasks: fetched once from the
package index, checked by SHA-256, read from a local cache ever after.

BIG-bench ships its task data only in its source distribution on PyPI (``bigbench==1.0.0``, a
358 MB ``.tar.gz``; installing it is not needed and takes minutes and 1.8 GB). :func:`fetch`
downloads that archive once (or takes one you already have), keeps only the task files listed in
:data:`FILES` (35 MB) in :func:`cache_dir`, and deletes the archive. Every read checks the file's
SHA-256, so a truncated, edited or different file is refused by name instead of giving other
numbers. Nothing is fetched from a model or data-set hub, and nothing at all while a task runs:
a missing file is an error that says the one command that fetches it.

(``pip download --no-deps --no-binary :all: bigbench==1.0.0`` gets the same archive with pip < 26;
pip 26 refuses it because its metadata names a direct-URL dependency. ``moslora data fetch
--sdist bigbench-1.0.0.tar.gz`` takes an archive fetched that way.)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path
from typing import Callable

SDIST = "bigbench-1.0.0.tar.gz"
SDIST_URL = "https://files.pythonhosted.org/packages/95/f8/c019b3579df548a04cac12342cfcb878e50ddf6cfcd7fddba8cfc721c157/" + SDIST
SDIST_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
SDIST_SIZE = 358_249_635
_MEMBER_ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks/"
# The task files the built-in tasks read (paths under benchmark_tasks/) and their SHA-256.
FILES = {
    "social_iqa/task.json": "edc9f568b70ae6d4af0783764dbe4e4f18aa1242c675a93f534338d73a565348",
    "cifar10_classification/base64/task.json": "226298409875f5b93ccda063863181f88723d39bac7eeef28a79843ae0aace31",
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
            f"(downloads {SDIST}, 358 MB, from PyPI and keeps only the task files, 35 MB; "
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
