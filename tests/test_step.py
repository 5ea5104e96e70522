"""The graph-ready training step, run eagerly on the CPU: the same parameters as the
plain step it replaced, a NaN caught at its pass without a sync per step, and the
warm-up before a CUDA graph capture undone exactly."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mnist_study.errors import Diverged
from mnist_study.training.augment import draw_affine
from mnist_study.training.config import TrainConfig
from mnist_study.training.step import SavedState, StaticStep, Stepper
from mnist_study.training.train import batch_order, build_model, make_optimizer

CFG = TrainConfig(train_size=1000, val_size=500, train_eval_size=500, threads=1)


def fresh(cfg: TrainConfig):
    torch.manual_seed(cfg.seed)
    model = build_model(cfg).to(memory_format=torch.channels_last)
    return model, make_optimizer(cfg, model)


def plain_steps(model, optimizer, x, y, cfg, batches, rng, steps) -> float:
    """The step as it was before static buffers (commit 7809ed0), kept as the oracle."""
    model.train()
    total, seen = 0.0, 0
    for _ in range(steps):
        _, idx = next(batches)
        xb, yb = x[idx], y[idx]
        if rng is not None:
            xb = plain_affine(xb, rng, cfg)
        loss = F.cross_entropy(model(xb.contiguous(memory_format=torch.channels_last)), yb)
        value = loss.item()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += value * len(idx)
        seen += len(idx)
    return total / seen


def plain_affine(xb, rng, cfg):
    """Augmentation as it was: parameters drawn and theta built on the CPU, one call."""

    def uniform(limit):
        return (torch.rand(xb.shape[0], generator=rng) * 2 - 1) * limit

    angle = uniform(math.radians(cfg.rotate_deg))
    scale = 1 + uniform(cfg.zoom)
    tx, ty = uniform(2 * cfg.shift), uniform(2 * cfg.shift)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(xb.shape), align_corners=False)
    return F.grid_sample(xb, grid, mode="bilinear", padding_mode="border", align_corners=False)


@pytest.mark.parametrize(
    "change",
    [
        {},
        {"batchnorm": True, "dropout": 0.3, "augment": True},
        {"optimizer": "sgd", "nesterov": True, "lr": 0.05, "weight_decay": 1e-3},
    ],
)
def test_static_step_gives_the_same_parameters_as_the_plain_step(small_splits, change):
    cfg = CFG.replace(**change)
    x, y = small_splits.train_x, small_splits.train_y
    steps = 40  # 2.5 passes of 1,000 images: includes a short last batch of 40 images
    results = []
    for static in (False, True):
        model, optimizer = fresh(cfg)
        batches = batch_order(len(x), cfg.batch_size, torch.Generator().manual_seed(0), x.device)
        rng = torch.Generator().manual_seed(1) if cfg.augment else None
        if static:
            running = Stepper(model, optimizer, x, y, cfg, graph=False).steps(batches, rng, steps)
        else:
            running = plain_steps(model, optimizer, x, y, cfg, batches, rng, steps)
        results.append((running, [p.detach().clone() for p in model.parameters()]))
    (plain_loss, plain), (static_loss, static) = results
    assert all(torch.equal(a, b) for a, b in zip(plain, static, strict=True))
    assert static_loss == pytest.approx(plain_loss, rel=1e-6)


def test_a_nan_mid_pass_is_caught_with_its_step_and_pass(small_splits):
    cfg = CFG  # 1,000 images: 16 steps per pass
    x, y = small_splits.train_x, small_splits.train_y
    model, optimizer = fresh(cfg)
    calls = []

    def poison(module, inputs, output):
        calls.append(1)
        return output * math.nan if len(calls) == 21 else output  # the 21st step

    model.register_forward_hook(poison)
    stepper = Stepper(model, optimizer, x, y, cfg, graph=False)
    batches = batch_order(len(x), cfg.batch_size, torch.Generator().manual_seed(0), x.device)
    stepper.steps(batches, None, 10)  # fine so far
    with pytest.raises(Diverged) as err:
        stepper.steps(batches, None, 100)
    assert (err.value.epoch, err.value.step) == (2, 21)
    # Caught at the end of pass 2 (step 32), not at the end of the 100 steps.
    assert stepper.done == 32 and "epoch 2, step 21" in str(err.value)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_warm_up_before_capture_is_undone_exactly(small_splits, optimizer):
    """What capture() does before recording, on the CPU: some steps, then restore in
    place (optimizer state first made by them back to a fresh optimizer's)."""
    cfg = CFG.replace(optimizer=optimizer, lr=0.01, batchnorm=True)
    x, y = small_splits.train_x, small_splits.train_y
    params = []
    for warm in (False, True):
        model, opt = fresh(cfg)
        stepper = Stepper(model, opt, x, y, cfg, graph=False)
        if warm:
            saved = SavedState(model, opt, stepper.totals)
            step = StaticStep(model, opt, x, y, cfg, 64, stepper.totals, graph=False)
            step.fill(torch.arange(64), None)
            for _ in range(3):
                step.body(set_to_none=True)
            ids = [id(p) for p in model.parameters()]
            saved.restore()
            assert ids == [id(p) for p in model.parameters()]
        batches = batch_order(len(x), cfg.batch_size, torch.Generator().manual_seed(0), x.device)
        stepper.steps(batches, None, 20)
        params.append([p.detach().clone() for p in model.parameters()])
        params[-1] += [b.clone() for b in model.buffers()]
    assert all(torch.equal(a, b) for a, b in zip(*params, strict=True))


def test_augmentation_draws_are_those_of_the_seeded_generator():
    a = draw_affine([8], torch.Generator().manual_seed(3), 10, 0.1, 0.1)
    b = draw_affine([8], torch.Generator().manual_seed(3), 10, 0.1, 0.1)
    assert a.shape == (4, 8) and torch.equal(a, b)
    assert a[0].abs().max() <= math.radians(10) and (a[1] - 1).abs().max() <= 0.1


def test_a_pass_drawn_at_once_is_the_same_as_batch_by_batch():
    """The oracle: per batch, its angles, scales, x and y shifts, one rand call each."""
    sizes = [64, 64, 64, 40]
    at_once = draw_affine(sizes, torch.Generator().manual_seed(5), 10, 0.1, 0.1)
    rng = torch.Generator().manual_seed(5)
    limits = [math.radians(10), 0.1, 0.2, 0.2]
    batches = [[(torch.rand(n, generator=rng) * 2 - 1) * lim for lim in limits] for n in sizes]
    for draws in batches:
        draws[1] = 1 + draws[1]
    one_by_one = torch.cat([torch.stack(draws) for draws in batches], 1)
    assert at_once.shape == (4, 232) and torch.equal(at_once, one_by_one)


def test_augmentation_stopped_mid_pass_resumes_with_the_same_draws(small_splits):
    """A pass's augmentation is drawn at its start: training in pieces that end mid-pass
    (evaluations, `steps`) must give what one go gives."""
    cfg = CFG.replace(augment=True)
    x, y = small_splits.train_x, small_splits.train_y
    params = []
    for pieces in ([40], [7, 13, 20]):
        model, optimizer = fresh(cfg)
        stepper = Stepper(model, optimizer, x, y, cfg, graph=False)
        batches = batch_order(len(x), cfg.batch_size, torch.Generator().manual_seed(0), x.device)
        rng = torch.Generator().manual_seed(1)
        for count in pieces:
            stepper.steps(batches, rng, count)
        params.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*params, strict=True))
