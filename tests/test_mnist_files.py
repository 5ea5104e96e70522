"""The data layer on small IDX files written in tmp_path, and the CLI's refusals."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
from helpers import cli

from mnist_study.errors import DataError
from mnist_study.files import write_atomic
from mnist_study.training.mnist_data import (
    check_file,
    ensure_files,
    idx_bytes,
    raw_dir,
    read_idx,
)


def small_files() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    return {
        "images": idx_bytes(rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)),
        "labels": idx_bytes(np.arange(6, dtype=np.uint8)),
    }


def expected_of(files: dict[str, bytes]) -> dict[str, tuple[str, int]]:
    return {k: (hashlib.md5(v).hexdigest(), len(v)) for k, v in files.items()}


def test_idx_round_trip(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a").write_bytes(idx_bytes(array))
    assert np.array_equal(read_idx(tmp_path / "a"), array)


def test_truncated_idx_is_refused(tmp_path):
    (tmp_path / "a").write_bytes(idx_bytes(np.zeros((2, 3), np.uint8))[:-1])
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "a")


def test_fetch_writes_valid_files_then_is_idempotent(tmp_path):
    files = small_files()
    calls = []

    def source():
        calls.append(1)
        return files

    assert ensure_files(tmp_path, [("src", source)], expected_of(files), log=str) == "src"
    assert (raw_dir(tmp_path) / "labels").read_bytes() == files["labels"]
    mtime = os.stat(raw_dir(tmp_path) / "images").st_mtime_ns
    # Second call: files present and valid, the source is not asked again.
    assert ensure_files(tmp_path, [("src", source)], expected_of(files), log=str) == "present"
    assert calls == [1]
    assert os.stat(raw_dir(tmp_path) / "images").st_mtime_ns == mtime


def test_falls_back_to_next_source(tmp_path):
    files = small_files()

    def offline():
        raise OSError("network unreachable")

    used = ensure_files(
        tmp_path, [("net", offline), ("mirror", lambda: files)], expected_of(files), log=str
    )
    assert used == "mirror"


def test_source_with_wrong_bytes_is_refused_and_nothing_written(tmp_path):
    files = small_files()
    bad = dict(files, labels=files["labels"][:-1] + b"\x09")
    with pytest.raises(DataError, match="labels has MD5 .* expected"):
        ensure_files(tmp_path, [("src", lambda: bad)], expected_of(files), log=str)
    assert not raw_dir(tmp_path).exists() or not any(raw_dir(tmp_path).iterdir())


def test_corrupt_file_on_disk_is_refused_with_both_checksums(tmp_path):
    files = small_files()
    expected = expected_of(files)
    ensure_files(tmp_path, [("src", lambda: files)], expected, log=str)
    path = raw_dir(tmp_path) / "images"
    path.write_bytes(path.read_bytes()[:100])  # truncated
    actual = hashlib.md5(path.read_bytes()).hexdigest()
    with pytest.raises(DataError) as err:
        ensure_files(tmp_path, [("src", lambda: files)], expected, log=str)
    message = str(err.value)
    assert str(path) in message and expected["images"][0] in message and actual in message
    assert "mnist-study data" in message and "\n" not in message


def test_killed_write_leaves_no_valid_looking_file(tmp_path, monkeypatch):
    target = tmp_path / "raw" / "file"

    def killed(fd):  # the process dies after writing, before the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, b"x" * 1000)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_check_file_missing(tmp_path):
    with pytest.raises(DataError, match="missing; run `mnist-study data`"):
        check_file(tmp_path / "nope", "0" * 32)


def test_cli_refuses_corrupt_dataset_before_training(tmp_path):
    from mnist_study.training.mnist_data import MNIST_FILES

    for name in MNIST_FILES:
        write_atomic(raw_dir(tmp_path) / name, b"not mnist")
    done = cli("--data-root", str(tmp_path), "train", "--epochs", "1", process=False)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "MD5" in lines[0] and "expected" in lines[0]
    assert "epoch" not in done.stdout


def test_cli_refuses_bad_config_value(tmp_path):
    done = cli("--data-root", str(tmp_path), "train", "--dropout", "1.5", process=False)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "mnist-study: error: command line: dropout = 1.5; must be in [0, 1)"
    )
