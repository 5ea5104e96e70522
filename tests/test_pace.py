"""The time left: each unit's known work priced at the seconds per image its study
measured (not an average over finished units)."""

from __future__ import annotations

import pytest
from helpers import copy_of

from mnist_study.study.pace import (
    PACE,
    Cost,
    Work,
    cell_costs,
    cost_of,
    image_seconds,
    study_seconds_left,
)
from mnist_study.study.runner import RunOptions, preflight
from mnist_study.study.spec_file import load_spec
from mnist_study.training.config import TrainConfig


def test_a_units_work_is_its_steps_times_batch_and_its_evaluations():
    cfg = TrainConfig(epochs=2, train_size=300, val_size=200, train_eval_size=100, test_size=500)
    work = Work.of(cfg, final=True)
    assert work.points == (5, 10)  # 300 images: 5 batches of 64 an epoch
    assert work.images_left(0) == (10 * 64, 2 * (100 + 200) + 500)
    assert work.images_left(1) == (5 * 64, 1 * (100 + 200) + 500)
    assert work.images_left(2) == (0, 500)  # the test set is all that is left
    assert Work.of(cfg, final=False).images_left(2) == (0, 0)
    assert work.seconds_left(1, Cost(train=0.01, eval=0.001)) == 5 * 64 * 0.01 + 800 * 0.001


def test_the_study_left_is_the_units_not_run_at_each_variants_measured_cost(
    finished, tmp_path, mnist_root
):
    spec_path, tracking, storage = copy_of(finished, tmp_path)
    spec_path.write_text(spec_path.read_text().replace("[0, 1]", "[0, 1, 2, 3]"))
    spec = load_spec(spec_path)  # extended by two seeds, not yet run
    opts = RunOptions(tracking, storage, str(mnist_root))
    stores = preflight(spec, opts)
    stores.attach(stores.create())

    expected = 0.0
    for tuning in spec.tunings:
        trials = stores.tune[tuning.key].trials + stores.final[tuning.key].trials
        records = [t.system_attrs[PACE] for t in trials]
        assert [r["reached"] for r in records] == [1] * 4  # one epoch each, all measured
        assert [r["train_images"] for r in records] == [5 * 64] * 4
        cost = cost_of(records)
        assert cost.train > 0 and cost.eval > 0
        # Left: seeds 2 and 3, each one epoch of 5 batches, an evaluation of 200
        # training and 200 validation images, and the test set's 500 images.
        expected += 2 * (320 * cost.train + 900 * cost.eval)
    assert study_seconds_left(stores.ledger(), workers=1) == pytest.approx(expected, rel=1e-9)
    assert study_seconds_left(stores.ledger(), workers=2) == pytest.approx(expected / 2, rel=1e-9)


def test_nothing_measured_yet_gives_no_time():
    assert cost_of([]) is None
    assert cost_of([{"train_s": 0.0, "train_images": 0, "eval_s": 0.0, "eval_images": 0}]) is None


def test_a_variant_not_yet_measured_is_priced_by_its_timed_step_not_the_others_mean():
    baseline = {"train_s": 2.0, "train_images": 1000, "eval_s": 0.5, "eval_images": 500}
    cfgs = {"baseline": TrainConfig(), "deeper": TrainConfig(convs_per_block=2)}
    costs = cell_costs({"baseline": [baseline]}, cfgs)
    assert costs["baseline"] == cost_of([baseline])  # measured: its own
    work = {name: image_seconds(cfg) for name, cfg in cfgs.items()}  # timed once, cached
    ratio = work["deeper"] / work["baseline"]
    assert costs["deeper"].train == pytest.approx(costs["baseline"].train * ratio)
    assert costs["deeper"].eval == pytest.approx(costs["baseline"].eval * ratio)
    assert cell_costs({}, cfgs) is None  # nothing measured: no price
