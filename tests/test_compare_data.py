"""The BIG-bench data of the built-in siqa and cifar10 tasks: a missing cache names the command that
fetches it, a corrupt file is refused by checksum and named, an archive is checked before and
after extraction, a failed download says how to fetch by hand, and nothing is fetched at run time."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import pytest

from moslora.compare import bigbench

SIQA = "social_iqa/task.json"


def _archive(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(bigbench._MEMBER_ROOT + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_a_missing_file_names_the_command_that_fetches_it(tmp_path):
    with pytest.raises(bigbench.DataMissingError) as error:
        bigbench.task_file(SIQA, tmp_path)
    message = str(error.value)
    assert str(tmp_path / SIQA) in message and "moslora data fetch" in message and "MOSLORA_DATA_DIR" in message
    assert bigbench.missing(tmp_path) == list(bigbench.FILES)


def test_a_corrupt_file_is_refused_by_checksum_naming_it(tmp_path):
    (tmp_path / "social_iqa").mkdir()
    (tmp_path / SIQA).write_text('{"examples": []}')
    with pytest.raises(ValueError, match=rf"{tmp_path / SIQA} does not match its checksum .*Delete it and run: moslora data fetch"):
        bigbench.task_file(SIQA, tmp_path)
    with pytest.raises(ValueError, match="unknown BIG-bench task file"):
        bigbench.task_file("nope/task.json", tmp_path)


def test_the_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MOSLORA_DATA_DIR", str(tmp_path / "data"))
    assert bigbench.cache_dir() == tmp_path / "data" / "bigbench-1.0.0"
    monkeypatch.delenv("MOSLORA_DATA_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert bigbench.cache_dir() == tmp_path / "xdg" / "moslora" / "bigbench-1.0.0"


def test_an_archive_that_is_not_the_sdist_is_refused_before_extraction(tmp_path):
    archive = _archive(tmp_path / "bigbench-1.0.0.tar.gz", {SIQA: b"{}"})
    with pytest.raises(ValueError, match="is not bigbench-1.0.0.tar.gz from PyPI: its SHA-256 differs"):
        bigbench.fetch(archive, tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache" / SIQA).exists()


def test_a_member_with_the_wrong_content_is_refused_and_nothing_half_written(tmp_path, monkeypatch):
    archive = _archive(tmp_path / "fake.tar.gz", {name: b"not the real file" for name in bigbench.FILES})
    monkeypatch.setattr(bigbench, "SDIST_SHA256", bigbench.sha256(archive))  # accept the archive, check its members
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=r"fake.tar.gz: bigbench-1.0.0/bigbench/benchmark_tasks/\S+ does not match its SHA-256"):
        bigbench.fetch(archive, cache, progress=False)
    assert bigbench.missing(cache) == list(bigbench.FILES)
    assert [p.name for p in cache.iterdir()] == []  # the staging folder is gone too


def test_a_failed_download_says_how_to_fetch_by_hand(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bigbench, "SDIST_URL", "http://127.0.0.1:9/bigbench-1.0.0.tar.gz")  # nothing listens there
    with pytest.raises(ConnectionError, match=r"(?s)could not download .*moslora data fetch --sdist bigbench-1.0.0.tar.gz"):
        bigbench.fetch(None, tmp_path / "cache", progress=False)
    from moslora.cli.main import main

    assert main(["data", "fetch", "--cache", str(tmp_path / "cli"), "--no-progress"]) == 1
    assert "moslora data: error: could not download" in capsys.readouterr().err


@pytest.mark.skipif(bool(bigbench.missing()), reason=f"BIG-bench cache absent ({bigbench.cache_dir()}); run `moslora data fetch`")
def test_fetch_extracts_verified_files_from_an_archive_and_keeps_intact_ones(tmp_path, monkeypatch, capsys):
    real = {name: bigbench.task_file(name).read_bytes() for name in bigbench.FILES}
    archive = _archive(tmp_path / "sdist.tar.gz", {"other_task/task.json": b"{}", **real})
    monkeypatch.setattr(bigbench, "SDIST_SHA256", bigbench.sha256(archive))
    from moslora.cli.main import main

    assert main(["data", "fetch", "--sdist", str(archive), "--cache", str(tmp_path / "c"), "--no-progress"]) == 0
    cache = tmp_path / "c" / "bigbench-1.0.0"
    assert "BIG-bench task files ready in" in capsys.readouterr().out
    assert {name: (cache / name).read_bytes() for name in bigbench.FILES} == real
    assert not (cache / "other_task").exists()  # only the files the tasks read
    # Already there and intact: nothing is read, not even the archive.
    archive.unlink()
    assert bigbench.fetch(archive, cache, progress=False) == cache
    shutil.rmtree(cache / "social_iqa")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        bigbench.fetch(archive, cache, progress=False)


def test_moslora_data_fetch_has_help(capsys):
    from moslora.cli.main import main

    for argv in (["data", "--help"], ["data", "fetch", "--help"]):
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code == 0
        assert "usage: moslora data" in capsys.readouterr().out
