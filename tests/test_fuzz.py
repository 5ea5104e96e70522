"""A seeded mutation loop over experiment files, command lines and store places, each
case the real CLI (in this process) on a tiny study in fresh stores. Every case must end
in exit 0 with the budget met in both stores and a report, or in exit 2 with at most 3
lines on stderr, no traceback, and nothing left behind. Cases that ever failed are kept
in fuzz_cases.json beside this file and replayed first; the loop's seed is printed with
any failure, so `FUZZ_SEED=N make test-slow ARGS='-k fuzz'` replays a run."""

from __future__ import annotations

import collections
import json
import os
import random
import shutil
import signal
from pathlib import Path

import pytest
from helpers import assert_budget_met_exactly, cli, copy_stores, stores
from mlflow.tracking import MlflowClient

from mnist_study.study.spec_file import load_spec

CASES = int(os.environ.get("FUZZ_CASES", 150))
SEED = int(os.environ.get("FUZZ_SEED", 0))
KEPT = Path(__file__).with_name("fuzz_cases.json")

BASE = """[study]
trials = 1
seeds = [0]
startup_trials = 1
[defaults]
steps = 2
evals = 1
batch_size = 16
train_size = 64
val_size = 64
train_eval_size = 64
test_size = 100
threads = 1
[variants.baseline]
search.lr = { low = 1e-3, high = 3e-3, log = true }
"""

VALUES = [
    "0", "-1", "1e308", "nan", "-inf", '"x"', '""', "true", "[]", "[0, 0]", "{}",
    "1979-05-27", "1979-05-27T07:32:00Z", "07:32:00", '"' + "x" * 30_000 + '"',
    '"é∂?#%"', "9" * 40, "{ low = 1, high = 0 }", "[[1]]", "0.5", "2",
]  # fmt: skip
LINES = [
    'name = "Default"', 'name = "a?b"', 'name = "' + "n" * 600 + '"', 'name = "ok-name"',
    'base = "missing.toml"', 'base = "/dev/zero"', 'base = "."', "tunings = 2",
    "train_sizes = [64, 32]", "epochs = 1", 'pruner = "median"', 'description = "d"',
    "set = { dropout = 0.5 }", "search.dropout = { low = 0.1, high = 0.5 }",
    "[variants.dropout]", "[defaults]", "[study]", "sampler_seed = 3", "seeds = [0, 1]",
    'description = "' + "d" * 25_000 + '"', "lr = 1979-05-27",
]  # fmt: skip
FLAGS = [
    [], [], [], [], [], [], ["--workers", "0"], ["--workers", "-1"], ["--workers", "many"],
    ["--workers", "1"], ["--threads", "-1"], ["--threads", "1"], ["--threads", "99999"],
    ["--tracking-uri", "ftp://x"], ["--tracking-uri", "sqlite:///{tmp}/q?x/m.db"],
    ["--tracking-uri", "sqlite:///{tmp}/50%/m.db"], ["--tracking-uri", "sqlite:///{tmp}/file/m.db"],
    ["--tracking-uri", "postgresql://u@127.0.0.1:1/x"], ["--storage", "{tmp}"],
    ["--storage", "{tmp}/file/o.journal"], ["--storage", "postgresql://u@127.0.0.1:1/x"],
    ["--bogus"], ["--workers"], ["--allow-mixed"],
]  # fmt: skip
PLACES = ["file"] * 8 + ["folder", "missing", "fifo", "bytes"]
# The stores a case runs on: fresh ones, or a finished study's (ORIGIN) after what befalls
# stores: an experiment of its name made by hand, a journal swapped for another run's,
# the folder copied by hand (its artifact place still the original's), one side emptied.
STORES = ["fresh"] * 10 + ["foreign", "swapped", "copied", "empty journal", "no mlflow"]
CHAINS = [0] * 8 + [3, 12]  # files chained by `base` before the case's own (bound: 8)
# The command: mostly `run`; else a read-only one on the same stores, which must read
# them or refuse in one line and never write them (report writes only after reading).
COMMANDS = ["run"] * 5 + ["report", "status", "plan"]


def mutated(rng: random.Random) -> dict:
    """One case: the experiment file's text, where it is, and the extra flags."""
    lines = BASE.splitlines()
    for _ in range(rng.choice([0, 1, 1, 2, 3])):  # some cases change only the command line
        op = rng.choice(["drop", "dup", "value", "typo", "add", "cut", "char", "nest"])
        i = rng.randrange(len(lines))
        if op == "drop" and len(lines) > 1:
            del lines[i]
        elif op == "dup":
            lines.insert(i, lines[i])
        elif op == "value" and "=" in lines[i]:
            lines[i] = f"{lines[i].split('=')[0]}= {rng.choice(VALUES)}"
        elif op == "typo" and "=" in lines[i]:
            j = rng.randrange(lines[i].index("=") or 1)
            lines[i] = lines[i][:j] + rng.choice("xq_.") + lines[i][j:]
        elif op == "add":
            lines.insert(i, rng.choice(LINES))
        elif op == "cut":
            text = "\n".join(lines)
            lines = text[: rng.randrange(1, len(text))].splitlines() or [""]
        elif op == "char":
            lines[i] += rng.choice(["\x00", "\\", '"', "[", "é"])
        elif op == "nest":  # tables or arrays nested past any reason
            depth = rng.choice([40, 3_000])
            lines.insert(i, rng.choice(["[" + ".".join(["t"] * depth) + "]",
                                        "x = " + "[" * depth + "]" * depth]))  # fmt: skip
    return {
        "text": "\n".join(lines) + "\n",
        "place": rng.choice(PLACES),
        "flags": rng.choice(FLAGS),
        "store": rng.choice(STORES),
        "chain": rng.choice(CHAINS),
        "command": rng.choice(COMMANDS),
    }


class CaseHung(BaseException):
    """A case ran past its time (a read that never ends, a wait on nothing)."""


def hung(signum, frame):
    raise CaseHung


def files_under(root: Path) -> list[str]:
    """Every path below `root` but the (empty) lock files a reader of a store takes."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.suffix != ".lock")


def start_stores(kind: str, folder: Path, made: dict[str, Path]) -> None:
    """The stores in `folder` a case starts from (see STORES); none for "fresh"."""
    if kind == "fresh":
        return
    if kind == "foreign":
        folder.mkdir()
        MlflowClient(stores(folder)[0]).create_experiment("fuzz")  # made by hand
    elif kind == "copied":
        shutil.copytree(made["origin"], folder)  # by hand: its artifact place unchanged
    else:
        copy_stores(made["origin"], folder)
        journal = folder / "optuna.journal"
        if kind == "swapped":
            shutil.copyfile(made["other"] / "optuna.journal", journal)
        elif kind == "empty journal":
            journal.write_bytes(b"")
        elif kind == "no mlflow":
            (folder / "mlflow.db").unlink()


def run_case(case: dict, root: Path, made: dict[str, Path]) -> tuple[str | None, str]:
    """Run one case in `root` (`made`: finished studies' stores to start from): (None if
    it behaved, else what went wrong; the command and how it ended)."""
    root.mkdir()
    (root / "file").write_text("a file where a folder should be")
    spec = root / "fuzz.toml"
    text, chain = case["text"], case.get("chain", 0)
    for k in range(1, chain + 1):
        last = k == chain
        (root / f"chain{k}.toml").write_text(BASE if last else f'base = "chain{k + 1}.toml"\n')
    text = f'base = "chain1.toml"\n{text}' if chain else text
    if case["place"] == "folder":
        spec.mkdir()
    elif case["place"] == "fifo":
        os.mkfifo(spec)
    elif case["place"] == "bytes":
        spec.write_bytes(b"\xff\xfe" + text.encode())
    elif case["place"] == "file":
        spec.write_text(text)
    start_stores(case.get("store", "fresh"), root / "s", made)
    tracking, storage = stores(root / "s")
    flags = [f.replace("{tmp}", str(root)) for f in case["flags"]]
    command = case.get("command", "run")
    if command != "run":  # a read-only command takes the store flags alone
        flags = flags if flags[:1] in (["--tracking-uri"], ["--storage"]) else []
        flags = flags if command != "plan" or flags[:1] != ["--storage"] else []
    before = files_under(root)
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(120)
    args = {
        "run": ["run", str(spec), "--tracking-uri", tracking, "--storage", storage, "--quiet"],
        "report": ["report", str(spec), "--tracking-uri", tracking, "--storage", storage,
                   "--out", str(root / "reports")],
        "status": ["status", str(spec), "--tracking-uri", tracking, "--storage", storage],
        "plan": ["plan", str(spec), "--tracking-uri", tracking],
    }[command] + flags  # fmt: skip
    for i, arg in enumerate(args[:-1]):  # the stores the case names last are those it uses
        tracking = args[i + 1] if arg == "--tracking-uri" else tracking
        storage = args[i + 1] if arg == "--storage" else storage
    try:
        done = cli(*args, process=False)
    except CaseHung:
        return "ran past 120 s", command
    except BaseException as exc:  # a bug: the traceback escaped the error boundary
        return f"raised {type(exc).__name__}: {str(exc)[:300]}", command
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    ended = f"{command} exit {done.returncode}"
    err = done.stderr.strip().splitlines()
    if done.returncode == 2:
        if len(err) > 3 or "Traceback" in done.stderr or not err:
            return f"exit 2 with {len(err)} lines: {done.stderr[-500:]}", ended
        if files_under(root) != before:
            left = sorted(set(files_under(root)) - set(before))
            return f"refused ({err[-1][:200]}) but left {left}", ended
        return None, ended
    if done.returncode != 0:
        return f"exit {done.returncode}: {done.stderr[-500:]}", ended
    if command in ("status", "plan") and files_under(root) != before:
        return f"{command} wrote {sorted(set(files_under(root)) ^ set(before))}", ended
    if command != "run":
        return None, ended
    database = Path(tracking.removeprefix("sqlite:///"))
    if tracking.startswith("sqlite:///") and not database.is_file():
        return f"exit 0, but no MLflow store at {database}: its runs went elsewhere", ended
    try:
        assert_budget_met_exactly(tracking, storage, load_spec(spec))
    except AssertionError as exc:
        return f"exit 0 but the stores disagree: {exc}", ended
    report = cli("report", str(spec), "--tracking-uri", tracking, "--storage", storage,
                 "--out", str(root / "reports"), process=False)  # fmt: skip
    if report.returncode != 0:
        return f"report exit {report.returncode}: {report.stderr}", ended
    return None, ended


@pytest.fixture
def made(tmp_path) -> dict[str, Path]:
    """The base study run to the end twice, in stores of their own: `origin`, and
    `other` (another sampler seed: another journal of a study of the same name)."""
    found = {}
    for name, extra in (("origin", ""), ("other", "sampler_seed = 7\n")):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "fuzz.toml").write_text(BASE.replace("[study]\n", f"[study]\n{extra}", 1))
        tracking, storage = stores(folder)
        done = cli("run", str(folder / "fuzz.toml"), "--tracking-uri", tracking,
                   "--storage", storage, "--quiet", process=False)  # fmt: skip
        assert done.returncode == 0, done.stderr
        found[name] = folder
    return found


@pytest.mark.slow
def test_every_mutated_case_runs_or_is_refused_in_one_line(tmp_path, mnist_root, made):
    kept = json.loads(KEPT.read_text())
    rng = random.Random(SEED)
    cases = kept + [mutated(rng) for _ in range(CASES)]
    failed, outcomes = [], collections.Counter()
    untouched = {name: files_under(folder) for name, folder in made.items()}
    for i, case in enumerate(cases):
        problem, ended = run_case(case, tmp_path / f"case{i}", made)
        changed = [name for name, folder in made.items() if files_under(folder) != untouched[name]]
        if changed:  # a copied store wrote into the one it was copied from
            problem = f"wrote into the stores of {changed}, which it was not given"
            untouched = {name: files_under(folder) for name, folder in made.items()}
        if problem:
            failed.append((i, problem, case))
        else:
            outcomes[ended] += 1
    print(f"fuzz: {len(cases)} cases ({len(kept)} kept), seed {SEED}: {sorted(outcomes.items())}")
    shown = [f"case {i}: {p}\n  {json.dumps(c)[:600]}" for i, p, c in failed]
    assert not failed, f"{len(failed)} of {len(cases)} cases (seed {SEED}):\n" + "\n".join(shown)
