"""Fashion-MNIST (Zalando, MIT licence) as Debian packages it: ``dataset-fashion-mnist``
``0.0~git20200523.55506a9-1``, 60,000 training and 10,000 test images of 28×28 grayscale clothing
in 10 classes, as IDX files under ``/usr/share/datasets/fashion-mnist/``.

:func:`extract` reads the ``.deb`` itself (an ``ar`` archive holding ``data.tar.xz``), so it needs
neither root nor dpkg, and keeps the four gzipped IDX files; :func:`read` decodes one split.
"""

from __future__ import annotations

import gzip
import io
import shutil
import struct
import tarfile
from pathlib import Path

import torch

from moslora.data.packages import Package, cached

LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
_INSIDE = "./usr/share/datasets/fashion-mnist/"


def _ar_members(deb: Path) -> dict[str, bytes]:
    """The members of an ``ar`` archive (a ``.deb``) by name."""
    data = deb.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise ValueError(f"{deb} is not a Debian package (no ar header)")
    members, at = {}, 8
    while at + 60 <= len(data):
        name, size = data[at : at + 16].decode().strip().rstrip("/"), int(data[at + 48 : at + 58].decode().strip())
        members[name] = data[at + 60 : at + 60 + size]
        at += 60 + size + size % 2
    return members


def extract(deb: Path, folder: Path) -> None:
    """Write the four IDX files of the package into ``folder``."""
    payload = next((v for k, v in _ar_members(deb).items() if k.startswith("data.tar")), None)
    if payload is None:
        raise ValueError(f"{deb} holds no data.tar member")
    wanted = {_INSIDE + name for pair in _FILES.values() for name in pair}
    with tarfile.open(fileobj=io.BytesIO(payload)) as tar:
        for member in tar:
            if member.name in wanted:
                with tar.extractfile(member) as src, open(folder / Path(member.name).name, "wb") as dst:
                    shutil.copyfileobj(src, dst)


def _idx(path: Path, dims: int) -> torch.Tensor:
    data = gzip.decompress(path.read_bytes())
    magic, *shape = struct.unpack(f">{1 + dims}I", data[: 4 * (1 + dims)])
    if magic != 0x800 + dims:
        raise ValueError(f"{path} is not an IDX file of {dims} dimension(s) of uint8 (magic {magic:#x})")
    return torch.frombuffer(bytearray(data[4 * (1 + dims) :]), dtype=torch.uint8).reshape(shape)


def read(split: str, cache: Path | None = None) -> tuple[torch.Tensor, list[int]]:
    """The images (N, 28, 28) uint8 and labels (indices into :data:`LABELS`) of ``train`` or ``test``."""
    if split not in _FILES:
        raise ValueError(f"Fashion-MNIST has splits {list(_FILES)}, not {split!r}")
    images, labels = (_idx(cached(FASHION_MNIST, name, cache), dims) for name, dims in zip(_FILES[split], (3, 1)))
    if len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST {split}: {len(images)} images but {len(labels)} labels")
    return images, labels.tolist()


FASHION_MNIST = Package(
    name="dataset-fashion-mnist",
    version="0.0~git20200523.55506a9-1",
    installer="apt",
    filename="dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb",
    sha256="39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0",
    size_mb=31,
    extract=extract,
    files={
        "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
        "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
        "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
        "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
    },
)
