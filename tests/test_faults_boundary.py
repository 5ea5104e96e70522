"""One error boundary per command: a failure of the environment (a file system that
refuses, a database that is not there) or a training that diverges ends in one line
that names what failed, exit code 2; `--debug` shows the traceback; a bug of ours is
never hidden."""

from __future__ import annotations

import pytest
from helpers import TINY, cli, copy_of, one_line_error, run_args

from mnist_study.errors import MESSAGE_CAP, ConfigError, environment_error


def test_a_diverging_train_is_one_line():
    done = cli(
        "train", "--optimizer", "sgd", "--lr", "10", "--weight-decay", "10", "--epochs", "1",
        "--train-size", "300", "--val-size", "200", "--train-eval-size", "200",
        process=False,
    )  # fmt: skip
    one_line_error(done, "loss became", "lower --lr")


def report_into_a_file(finished, tmp_path, *flags: str):
    """`report --page` of a finished study, the page's folder being a file."""
    spec, tracking, storage = copy_of(finished, tmp_path)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    args = ["report", str(spec), "--tracking-uri", tracking, "--storage", storage]
    args += ["--page", str(blocker / "page.md"), "--out", str(tmp_path / "reports")]
    return blocker, cli(*flags, *args, process=False)


def test_a_report_page_under_a_file_is_one_line(finished, tmp_path):
    blocker, done = report_into_a_file(finished, tmp_path)
    one_line_error(done, str(blocker), "not a directory")  # tried before anything is read
    assert not (tmp_path / "reports").exists()


def test_a_database_nothing_listens_on_is_one_line(tmp_path):
    (tmp_path / "s.toml").write_text(TINY)
    url = "postgresql+psycopg://nobody@127.0.0.1:9/none"  # port 9: nothing listens
    done = cli(*run_args(tmp_path / "s.toml", f"sqlite:///{tmp_path}/m.db", url), process=False)
    one_line_error(done, "127.0.0.1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.toml"]  # nothing created


def test_a_huge_value_is_cut_to_the_message_cap(tmp_path):
    seeds = ", ".join(str(-s) for s in range(10_000))
    (tmp_path / "s.toml").write_text(TINY.replace("seeds = [0, 1]", f"seeds = [{seeds}]"))
    done = cli("run", str(tmp_path / "s.toml"), process=False)
    one_line_error(done, "study.seeds = [0, -1, -2", "at most 1000 seeds")
    assert len(done.stderr) <= MESSAGE_CAP + len("mnist-study: error: \n")


def test_debug_shows_the_traceback(finished, tmp_path):
    with pytest.raises(ConfigError, match="not a directory"):
        report_into_a_file(finished, tmp_path, "--debug")


def test_only_the_environments_failures_are_caught():
    assert environment_error(PermissionError(13, "Permission denied", "/x"))
    assert environment_error(OSError(28, "No space left on device"))
    assert not environment_error(KeyError("a bug of ours"))
    assert not environment_error(TypeError("a bug of ours"))
