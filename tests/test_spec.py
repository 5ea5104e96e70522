"""Experiment files: every shipped file loads; every kind of mistake is refused early."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from helpers import REPO, TINY, cli

from mnist_study.analysis.summary import at_edge
from mnist_study.errors import ConfigError, SpecError
from mnist_study.study.scheduler import distributions, propose
from mnist_study.study.spec_file import load_spec

EXPERIMENTS = sorted((REPO / "experiments").glob("*.toml"))
STUDY_VARIANTS = [
    "baseline",
    "batchnorm",
    "dropout",
    "weight_decay",
    "sgd_momentum",
    "augmentation",
    "deeper",
    "combined",
]

GOOD = """
[study]
trials = 2
[variants.baseline]
search.lr = { low = 1e-4, high = 1e-2, log = true }
"""


def test_shipped_files_load_and_say_how_to_run(tmp_path):
    assert {p.stem for p in EXPERIMENTS} >= {"ablations", "quick", "smoke"}
    for path in EXPERIMENTS:
        spec = load_spec(path)
        assert [v.name for v in spec.variants] == list(spec.settings.variants or STUDY_VARIANTS)
        head = path.read_text().splitlines()[:6]
        assert head[0].startswith("#") and any("Run:" in line for line in head)
        for v in spec.variants:
            assert "lr" in v.search and v.description


def test_variant_states_only_its_change():
    spec = load_spec(REPO / "experiments" / "ablations.toml")
    by_name = {v.name: v for v in spec.variants}
    assert by_name["baseline"].changes == {}
    assert by_name["batchnorm"].changes == {"batchnorm": True}
    assert set(by_name["dropout"].search) == {"lr", "dropout"}
    cfg = spec.config_for(by_name["sgd_momentum"], {"lr": 0.05, "momentum": 0.9})
    assert (cfg.optimizer, cfg.nesterov, cfg.lr, cfg.epochs) == ("sgd", True, 0.05, 5)


BAD = {
    "unknown top key": ("[stuudy]\ntrials = 2\n", "unknown key 'stuudy'"),
    "unknown study key": (GOOD.replace("trials = 2", "trails = 2"), "unknown key 'study.trails'"),
    "mlflow default": ('name = "Default"\n' + GOOD, "name = 'Default'; is MLflow's own experiment"),
    "datetime value": (
        "description = 1979-05-27T07:32:00Z\n" + GOOD,
        "description = 1979-05-27T07:32:00+00:00 is datetime; must be str",
    ),
    "date value": (GOOD + "set = { lr = 1979-05-27 }\n", "lr = 1979-05-27 is date; must be float"),
    "description too long": (
        f'description = "{"x" * 25_000}"\n' + GOOD,
        "description as recorded in MLflow is 25,",
    ),
    "variant description too long": (
        GOOD + f'description = "{"x" * 9_000}"\n',
        "variants.baseline.description is 9,000 characters; MLflow keeps at most 8,000",
    ),
    "zero trials": (
        GOOD.replace("trials = 2", "trials = 0"),
        "study.trials = 0; must be in [1, 10000]",
    ),
    "wrong type": (GOOD.replace("trials = 2", 'trials = "2"'), "study.trials = '2'"),
    "unknown switch": (GOOD + "set = { batchnrom = true }\n", "unknown key 'batchnrom'"),
    "switch type": (GOOD + "set = { batchnorm = 1 }\n", "batchnorm = 1 is int; must be bool"),
    "inverted range": (
        GOOD.replace("low = 1e-4, high = 1e-2", "low = 1e-2, high = 1e-4"),
        "low 0.01 must be below high 0.0001",
    ),
    "empty range": (GOOD.replace("high = 1e-2", "high = 1e-4"), "must be below high"),
    "log of zero": (GOOD.replace("low = 1e-4", "low = 0"), "log scale needs low > 0"),
    "not searchable": (
        GOOD + "search.optimizer = { low = 0, high = 1 }\n",
        "search.optimizer: not a numeric config field",
    ),
    "range outside config": (
        GOOD + "search.dropout = { low = 0.5, high = 1.5 }\n",
        "dropout = 1.5; must be in [0, 1)",
    ),
    "duplicate variant": (GOOD + GOOD.split("[study]\ntrials = 2\n")[1], "not valid TOML"),
    "no variants": ("[study]\ntrials = 2\n", "variants: none defined"),
    "empty search": ("[variants.baseline]\nset = { batchnorm = true }\n", "search: empty"),
    "bad seeds": (GOOD.replace("trials = 2", "trials = 2\nseeds = [1, 1]"), "study.seeds"),
    "bad pruner": (
        GOOD.replace("trials = 2", 'trials = 2\npruner = "hyperband"'),
        "study.pruner = 'hyperband'; must be one of 'median', 'none'",
    ),
    "bad default": (
        "[defaults]\nepochs = 0\n" + GOOD,
        "defaults: epochs = 0; must be in [1, 1000]",
    ),
    "nan in set": (GOOD + "set = { dropout = nan }\n", "dropout = nan; must be in [0, 1)"),
    "inf bound": (
        GOOD + "search.dropout = { low = 0.1, high = inf }\n",
        "low 0.1 and high inf must be finite",
    ),
    "huge lr range": (
        GOOD.replace("high = 1e-2", "high = 1e308"),
        "lr = 1e+308; must be in (0, 10]",
    ),
    "unbounded epochs": (
        GOOD + "search.epochs = { low = 1, high = 100000 }\n",
        "epochs = 100000; must be in [1, 1000]",
    ),
    "negative rotation": (
        GOOD + "set = { augment = true, rotate_deg = -5.0 }\n",
        "rotate_deg = -5.0; must be in [0, 180]",
    ),
    "nan shift": (GOOD + "set = { shift = nan }\n", "shift = nan"),
    "zoom too big": (GOOD + "set = { zoom = 3.0 }\n", "zoom = 3.0; must be in [0, 0.9]"),
    "bad sampler seed": (
        GOOD.replace("trials = 2", "trials = 2\nsampler_seed = -1"),
        "study.sampler_seed = -1; must be in [0, 4294967295]",
    ),
    "seed too big": (GOOD.replace("trials = 2", "trials = 2\nseeds = [1, 2e10]"), "study.seeds"),
    "unknown selected variant": (
        GOOD.replace("trials = 2", 'trials = 2\nvariants = ["baseline", "dropuot"]'),
        "study.variants: dropuot not defined; defined: baseline",
    ),
    "selection without baseline": (
        GOOD.replace("trials = 2", 'trials = 2\nvariants = ["dropout"]')
        + "[variants.dropout]\nset = { dropout = 0.5 }\nsearch.lr = { low = 1e-4, high = 1e-2 }\n",
        "study.variants: add 'baseline'",
    ),
    "selection not names": (
        GOOD.replace("trials = 2", "trials = 2\nvariants = [1]"),
        "study.variants = [1]; must be a non-empty list of distinct variant names",
    ),
    "missing high": (GOOD.replace(", high = 1e-2", ""), "search.lr.high: missing (The highest"),
    "variant not a table": ("[variants]\nbaseline = 3\n", "baseline = 3 is int; must be a table"),
    "deep nesting": ("x = " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_file_is_refused_naming_file_and_key(tmp_path, case):
    text, expected = BAD[case]
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:  # SpecError, or ConfigError from TrainConfig
        load_spec(path)
    assert str(path) in str(err.value) and expected in str(err.value)
    assert "\n" not in str(err.value)


def test_cli_refuses_bad_file_with_exit_2_and_writes_nothing(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(BAD["inverted range"][0])
    done = cli(
        "run",
        str(path),
        "--tracking-uri",
        f"sqlite:///{tmp_path}/m/mlflow.db",
        "--storage",
        str(tmp_path / "o" / "optuna.journal"),
        process=False,
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and f"error: {path}" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.toml"]


def test_unreadable_files_are_refused_in_one_line(tmp_path):
    binary = tmp_path / "latin1.toml"
    binary.write_bytes(GOOD.encode() + "# café\n".encode("latin-1"))
    with pytest.raises(SpecError, match=r"not UTF-8 text \(byte \d+\); save it as UTF-8"):
        load_spec(binary)
    with pytest.raises(SpecError, match="is a folder"):
        load_spec(tmp_path)


def test_a_fifo_a_device_or_a_huge_file_is_refused_unread(tmp_path):
    import os

    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)  # reading it would wait for a writer forever
    huge = tmp_path / "huge.toml"
    huge.write_text(GOOD + "#" * 2_000_000 + "\n")
    child = tmp_path / "child.toml"
    child.write_text('base = "fifo.toml"\n')
    for path, expected in [
        (fifo, f"{fifo}: not a regular file"),
        (Path("/dev/zero"), "/dev/zero: not a regular file"),
        (huge, "bytes; an experiment file is at most 1,000,000"),
        (child, f"{fifo}: not a regular file"),
    ]:
        with pytest.raises(SpecError) as err:
            load_spec(path)
        assert expected in str(err.value) and "\n" not in str(err.value)


def test_every_numeric_config_field_has_a_range():
    from mnist_study.training.config import TrainConfig

    for key, field in TrainConfig.model_fields.items():
        if field.annotation in (int, float):
            kinds = {type(m).__name__ for m in field.metadata}
            assert kinds & {"Ge", "Gt"} and kinds & {"Le", "Lt"}, key
            huge = 1e300 if field.annotation is float else 10**12  # above every bound
            with pytest.raises(
                ConfigError, match=f"{key} = {huge!r}; must be in ".replace("+", r"\+")
            ):
                TrainConfig().replace(**{key: huge})


def test_a_derived_spec_states_only_its_overrides(tmp_path):
    ablations = load_spec(REPO / "experiments" / "ablations.toml")
    quick = load_spec(REPO / "experiments" / "quick.toml")
    assert quick.name == "quick"  # the base's name is never inherited
    assert quick.variants == ablations.variants
    assert (quick.settings.trials, quick.settings.seeds) == (4, (0, 1))
    assert (quick.defaults.epochs, quick.defaults.train_size) == (2, 10_000)
    assert quick.defaults.batch_size == ablations.defaults.batch_size
    assert quick.resolved["variants"] == ablations.resolved["variants"]
    (tmp_path / "base.toml").write_text(GOOD + 'description = "base"\n')
    child = tmp_path / "child.toml"
    # A table merges key by key: a variant's range changes, its description stays.
    child.write_text('base = "base.toml"\n[variants.baseline.search.lr]\nhigh = 3e-2\n')
    (baseline,) = load_spec(child).variants
    assert (baseline.search["lr"].low, baseline.search["lr"].high) == (1e-4, 3e-2)
    assert baseline.description == "base"


def test_a_follow_up_runs_only_the_variants_it_declares():
    sweep = load_spec(REPO / "experiments" / "scarcity.toml")
    follow_up = load_spec(REPO / "experiments" / "scarcity300.toml")
    by_name = {v.name: v for v in sweep.variants}
    assert [c.key for c in follow_up.cells] == [
        "baseline.n300",
        "batchnorm.n300",
        "weight_decay.n300",
    ]
    assert all(v == by_name[v.name] for v in follow_up.variants)  # one definition
    assert not set(follow_up.settings.seeds) & set(sweep.settings.seeds)  # new seeds


@pytest.mark.parametrize(
    "text, expected",
    [
        ('base = "base.toml"\n[study]\ntrails = 3\n', "unknown key 'study.trails'"),
        ('base = "base.toml"\n[defaults]\nepoch = 3\n', "unknown key 'epoch'"),
        ('base = "nope.toml"\n', "nope.toml: no such experiment file"),
        ('base = "child.toml"\n', "leads back to itself"),
        ("base = 3\n", "base = 3; must be the file name of another spec"),
    ],
    ids=["study key", "defaults key", "missing base", "cycle", "not a name"],
)
def test_bad_derived_spec_is_refused(tmp_path, text, expected):
    (tmp_path / "base.toml").write_text(GOOD)
    child = tmp_path / "child.toml"
    child.write_text(text)
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(")) as err:
        load_spec(child)
    assert "\n" not in str(err.value)


def test_a_base_chain_is_bounded_before_pythons_recursion_limit(tmp_path):
    """A chain of thousands of files would end in RecursionError: refused at the bound,
    naming it, and a chain at the bound still reads."""
    from mnist_study.study.spec_file import MAX_BASES

    (tmp_path / "c0.toml").write_text(GOOD)
    for i in range(1, 2000):
        (tmp_path / f"c{i}.toml").write_text(f'base = "c{i - 1}.toml"\n')
    assert load_spec(tmp_path / f"c{MAX_BASES - 1}.toml").name == f"c{MAX_BASES - 1}"
    for top in (MAX_BASES, 1999):
        with pytest.raises(SpecError, match=f"chain of more than {MAX_BASES} files") as err:
            load_spec(tmp_path / f"c{top}.toml")
        assert "\n" not in str(err.value)


def test_a_change_in_the_base_is_a_changed_study(tmp_path):
    import json

    from mnist_study.study.record import refuse_changed_study, spec_from_record

    (tmp_path / "base.toml").write_text(GOOD)
    child = tmp_path / "child.toml"
    child.write_text('base = "base.toml"\n[study]\nseeds = [0]\n')
    recorded = json.dumps(load_spec(child).resolved)
    refuse_changed_study(
        load_spec(child), spec_from_record(recorded, child), "store"
    )  # unchanged: resumes
    (tmp_path / "base.toml").write_text(GOOD.replace("high = 1e-2", "high = 2e-2"))
    with pytest.raises(SpecError, match=r"changed since study 'child' started in store \(variants"):
        refuse_changed_study(load_spec(child), spec_from_record(recorded, child), "store")


def test_a_changed_default_in_the_code_is_a_changed_study(tmp_path):
    """The record spells every default out: a study started when the code's default was
    another value is refused on resume; how runs execute (threads, device) is not design."""
    import json

    from mnist_study.study.record import refuse_changed_study, spec_from_record

    path = tmp_path / "study.toml"
    path.write_text(GOOD)
    spec = load_spec(path)
    recorded = json.loads(spec.record())
    assert recorded["defaults"]["train_eval_size"] == spec.defaults.train_eval_size
    started_under_old_code = recorded | {
        "defaults": recorded["defaults"] | {"train_eval_size": 5000}
    }
    with pytest.raises(SpecError, match=r"\(\[defaults\]\)"):
        refuse_changed_study(
            spec, spec_from_record(json.dumps(started_under_old_code), path), "store"
        )
    path.write_text("[defaults]\nthreads = 1\n" + GOOD)
    refuse_changed_study(load_spec(path), spec_from_record(spec.record(), path), "store")


def test_missing_file(tmp_path):
    with pytest.raises(SpecError, match="no such experiment file"):
        load_spec(Path(tmp_path / "nope.toml"))


def test_the_tiny_spec_cannot_raise_a_check_whatever_its_trials_score(tmp_path):
    """Tests that assert 'Checks: none raised' run TINY: its points must not depend on the
    trials' values (which follow the CPU's rounding), sit off the range's edges, and
    leave nothing for the pruner, so that the assertion holds on every machine."""
    (tmp_path / "tiny.toml").write_text(TINY)
    spec = load_spec(tmp_path / "tiny.toml")
    s = spec.settings
    assert s.startup_trials >= s.trials  # every trial a random startup point, unprunable
    for tuning in spec.tunings:
        points = []
        for values in ((0.1, 0.9), (0.9, 0.1)):  # either trial may win
            done = []
            for value in values:
                point = propose(tuning, done, s.startup_trials)
                dist = distributions(tuning.cell)
                trial = optuna.trial.create_trial(params=point, distributions=dist, value=value)
                done.append(trial)
            points.append([t.params for t in done])
        assert points[0] == points[1]
        for point in points[0]:
            for key, value in point.items():
                r = tuning.cell.search[key]
                assert not at_edge(value, r.low, r.high, r.log), (tuning.key, key, value)


def test_raising_tunings_or_adding_seeds_alone_extends_a_study(tmp_path):
    """Those two changes alone are accepted (and said); with anything else, or from a
    study tuned once (its runs carry no tuning index), the study is still refused."""
    from mnist_study.study.record import refuse_changed_study, spec_from_record

    path = tmp_path / "grow.toml"
    path.write_text(GOOD.replace("trials = 2", "trials = 2\ntunings = 3\nseeds = [0, 1]"))
    recorded = load_spec(path).record()

    def again(text: str):
        path.write_text(text)
        return refuse_changed_study(load_spec(path), spec_from_record(recorded, path), "store")

    start = GOOD.replace("trials = 2", "trials = 2\ntunings = 3\nseeds = [0, 1]")
    assert again(start) is None
    assert again(start.replace("tunings = 3", "tunings = 8")) == "study.tunings 3 -> 8"
    both = start.replace("tunings = 3", "tunings = 5").replace("[0, 1]", "[0, 1, 2]")
    assert again(both) == "study.tunings 3 -> 5, study.seeds + [2]"
    for other in (
        start.replace("tunings = 3", "tunings = 2"),  # fewer: finished units would be dropped
        start.replace("[0, 1]", "[0, 2]"),  # seed 1 dropped
        start.replace("tunings = 3", "tunings = 8").replace("trials = 2", "trials = 3"),
    ):
        with pytest.raises(SpecError, match=r"\(\[study\]\).*adding study.seeds alone"):
            again(other)
    path.write_text(GOOD)
    recorded = load_spec(path).record()
    with pytest.raises(SpecError, match=r"study.tunings 1 -> 2: a study tuned once"):
        again(GOOD.replace("trials = 2", "trials = 2\ntunings = 2"))


def test_one_place_says_what_a_runs_points_count():
    """`evals` alone also indexes a run by optimizer step (train() logs steps): every
    table, figure and console line takes the word from TrainConfig.axis."""
    from mnist_study.training.config import TrainConfig
    from mnist_study.training.train import evaluation_points, last_point

    assert TrainConfig().axis == "epoch" and TrainConfig().length == "5 epochs"
    only_evals = TrainConfig(epochs=2, evals=3, batch_size=10)
    assert only_evals.axis == "step" and only_evals.length == "2 epochs"
    assert last_point(only_evals, 100) == evaluation_points(only_evals, 100)[-1] == 20
    assert TrainConfig(steps=600).axis == "step"
    assert TrainConfig(steps=600).length == "600 optimizer steps"


def test_a_study_name_finds_its_experiment_file(tmp_path, monkeypatch):
    """`mnist-study run ablations` runs experiments/ablations.toml, as `report ablations`
    reports it; a path, or a name without such a file, is taken as given."""
    from mnist_study.study.spec_file import find_spec

    monkeypatch.chdir(tmp_path)
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "tiny.toml").write_text("")
    (tmp_path / "here.toml").write_text("")
    assert find_spec("tiny") == Path("experiments/tiny.toml")
    assert find_spec("here.toml") == Path("here.toml")
    assert find_spec("nothing") == Path("nothing")  # refused by load_spec, naming it
    (tmp_path / "tiny").write_text("")  # a file of that name is what it names
    assert find_spec("tiny") == Path("tiny")
