"""A file system that refuses (read-only, full, unreadable, a folder where a file belongs)
and a file that changes mid-study: each ends in one line that names the path and says
what would be right, exit 2, nothing written; a study stopped so resumes to its budget.
Read-only and full file systems are real mounts (a bind mount remounted read-only, a
tiny tmpfs); where this user may not mount, those tests are skipped with the reason."""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from helpers import (
    TINY,
    cli,
    command,
    copy_of,
    one_line_error,
    run_args,
    stores,
    trial_states,
)

from mnist_study.study.runner import RunOptions, preflight, run_study, worker_main
from mnist_study.study.spec_file import load_spec


@contextlib.contextmanager
def mounted(target: Path, *how: str):
    """`mount ... target` for the block, or the test skipped where mounting is refused."""
    target.mkdir(exist_ok=True)
    done = subprocess.run(["mount", *how, str(target)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount here ({done.stderr.strip() or done.returncode})")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=True)


@contextlib.contextmanager
def read_only(folder: Path):
    """`folder` itself, read-only for the block (a bind mount onto itself)."""
    with mounted(folder, "--bind", str(folder)):
        remount = ["mount", "-o", "remount,ro,bind", str(folder)]
        if subprocess.run(remount, capture_output=True).returncode:
            pytest.skip("cannot remount read-only here")
        yield folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_read_only_store_is_one_line_for_run_and_report(finished, tmp_path):
    spec, tracking, storage = copy_of(finished, tmp_path)
    folder = Path(storage).parent
    before = snapshot(folder)
    with read_only(folder):
        ran = cli(*run_args(spec, tracking, storage), process=False)
        reported = cli(
            "report", str(spec), "--tracking-uri", tracking, "--storage", storage,
            "--out", str(tmp_path / "reports"), process=False,
        )  # fmt: skip
    one_line_error(ran, str(folder), "Read-only file system", "choose a writable place")
    one_line_error(reported, "Read-only file system", "open a store for writing even to read")
    assert snapshot(folder) == before
    assert not (tmp_path / "reports").exists()


def test_a_report_into_a_read_only_folder_writes_nothing(finished, tmp_path):
    spec, tracking, storage = copy_of(finished, tmp_path)
    shut = tmp_path / "docs"
    shut.mkdir()
    with read_only(shut):
        done = cli(
            "report", str(spec), "--tracking-uri", tracking, "--storage", storage,
            "--page", str(shut / "page.md"), "--out", str(tmp_path / "reports"), process=False,
        )  # fmt: skip
    one_line_error(done, str(shut), "Read-only file system", "choose a writable place")
    assert list(shut.iterdir()) == []


def test_a_folder_given_as_the_optuna_storage_is_one_line(finished, tmp_path):
    spec, tracking, storage = copy_of(finished, tmp_path)
    folder = str(Path(storage).parent)
    args = ["report", str(spec), "--tracking-uri", tracking, "--storage", folder]
    done = cli(*args, "--out", str(tmp_path / "reports"), process=False)
    one_line_error(done, f"--storage {folder}: is a folder; give a file path")


def assert_redone_once(storage: str, spec) -> None:
    """The unit that failed is kept as FAIL and was redone: the budget complete beside it."""
    states = trial_states(storage, spec)
    assert sum(counts["FAIL"] for counts in states.values()) == 1
    assert all(counts["COMPLETE"] == 2 for counts in states.values())  # TINY: 2 and 2


def test_a_full_temporary_folder_stops_the_study_in_one_line_and_resumes(tmp_path, monkeypatch):
    """A model is saved through the temporary folder (TMPDIR): a full one stops the run
    that saves it (torch says so as a RuntimeError), and the resume redoes that run."""
    (tmp_path / "tiny.toml").write_text(TINY)
    tracking, storage = stores(tmp_path)
    args = run_args(tmp_path / "tiny.toml", tracking, storage)
    with mounted(tmp_path / "tmp", "-t", "tmpfs", "-o", "size=256k", "tmpfs") as full:
        (full / "filler").write_bytes(b"\0" * 200 * 1024)  # room for a probe, not a model
        with monkeypatch.context() as patch:  # TMPDIR as this process has read it
            patch.setattr(tempfile, "tempdir", str(full))
            done = cli(*args, process=False)
    one_line_error(done, str(full), "no space left for the model", "free some space there")
    spec = load_spec(tmp_path / "tiny.toml")
    assert sum(states["FAIL"] for states in trial_states(storage, spec).values()) == 1
    resumed = cli(*args, process=False)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    said = "resuming study 'tiny': 2 of 8 units done and kept, 6 to run; 1 interrupted"
    assert said in resumed.stdout  # the two trials before the failed first seed
    assert_redone_once(storage, spec)


def mnist_copy(mnist_root: Path, target: Path) -> Path:
    shutil.copytree(Path(mnist_root) / "MNIST", target / "MNIST")
    return target / "MNIST" / "raw" / "train-images-idx3-ubyte"


def as_a_user(args: list[str]) -> subprocess.CompletedProcess:
    """`args` run without the capabilities that let root read and write any file (so a
    file's mode applies as it would to any user), or the test skipped without setpriv."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    no_override = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
    return subprocess.run(no_override + args, capture_output=True, text=True)


@pytest.mark.parametrize("store", ["mlflow.db", "optuna.journal"])
def test_a_read_only_store_file_is_one_line(finished, tmp_path, store):
    spec, tracking, storage = copy_of(finished, tmp_path)
    spec.write_text(TINY.replace("seeds = [0, 1]", "seeds = [0, 1, 2]"))  # one more to run
    shut = Path(storage).parent / store
    before = snapshot(shut.parent)
    shut.chmod(0o444)
    done = as_a_user(command(*run_args(spec, tracking, storage)))
    one_line_error(done, f"{shut}: cannot write it (read-only for this user)", "chmod u+w")
    assert snapshot(shut.parent) == before


def test_mnist_files_this_user_cannot_read_are_one_line(tmp_path, mnist_root):
    images = mnist_copy(mnist_root, tmp_path / "data")
    images.chmod(0)
    (tmp_path / "tiny.toml").write_text(TINY)
    run = command(*run_args(tmp_path / "tiny.toml", *stores(tmp_path)))
    run[run.index("--data-root") + 1] = str(tmp_path / "data")
    done = as_a_user(run)
    one_line_error(done, str(images), "Permission denied", "give this user access")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "tiny.toml"]


def test_a_byte_flipped_mid_study_stops_the_worker_that_loads_it(tmp_path, mnist_root, capsys):
    """The command checked the data before the study began; a worker that loads it later
    checks the bytes it uses, stops in one line (exit 2) with its unit FAIL, and the
    resume on sound data completes the budget."""
    (tmp_path / "tiny.toml").write_text(TINY)
    spec = load_spec(tmp_path / "tiny.toml")
    tracking, storage = stores(tmp_path)
    opts = RunOptions(tracking, storage, str(mnist_root), quiet=True, log_models=False)
    experiment_id = preflight(spec, opts).create()
    images = mnist_copy(mnist_root, tmp_path / "data")
    with open(images, "r+b") as f:
        f.seek(5000)
        byte = f.read(1)
        f.seek(5000)
        f.write(bytes([byte[0] ^ 0xFF]))
    flipped = dataclasses.replace(opts, data_root=str(tmp_path / "data"))
    with pytest.raises(SystemExit) as stopped:
        worker_main(spec, flipped, experiment_id, 1)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("mnist-study: error: ") and err.count("\n") == 1, err
    assert str(images) in err and "corrupt or truncated" in err
    assert sum(states["FAIL"] for states in trial_states(storage, spec).values()) == 1
    run_study(spec, opts)
    assert_redone_once(storage, spec)


@pytest.mark.parametrize("where", ["a 300-byte study name", "artifacts is a file"])
def test_a_place_the_study_could_not_write_its_models_is_refused_before_training(tmp_path, where):
    """Tried when the first final seed logged its model, this would stop a study after
    minutes of training: every place a study writes is tried before its first run."""
    text = TINY
    if where == "a 300-byte study name":
        text = f'name = "{"a" * 300}"\n' + TINY
    else:
        (tmp_path / "artifacts").write_text("a file where the artifacts folder goes")
    (tmp_path / "tiny.toml").write_text(text)
    tracking, storage = stores(tmp_path)
    done = cli(*run_args(tmp_path / "tiny.toml", tracking, storage), process=False)
    if where == "a 300-byte study name":
        one_line_error(done, "300 bytes", "file systems allow 255", "shorter name")
    else:
        one_line_error(done, str(tmp_path / "artifacts"), "not a directory")
    assert not Path(storage).exists() and not (tmp_path / "mlflow.db").exists()


def test_a_report_whose_folders_are_files_is_refused_before_it_reads(finished, tmp_path):
    spec, tracking, storage = copy_of(finished, tmp_path)
    (tmp_path / "docs").write_text("a file where the page's folder goes")
    for flag in (["--out", str(tmp_path / "docs" / "reports")], ["--page", "docs/tiny.md"]):
        done = cli("report", str(spec), "--tracking-uri", tracking, *flag, process=False,
                   cwd=tmp_path)  # fmt: skip
        one_line_error(done, flag[0], "not a directory")
    assert not (tmp_path / "reports").exists()
