"""The training step on static buffers: the same code runs eagerly on a CPU and, on a
CUDA GPU, is captured once as a CUDA graph and replayed.

On a GPU a step of this small net is bound by Python and kernel launches, not by
arithmetic; a replayed graph launches the whole step (gather, augmentation, forward,
backward, optimizer) at once. For that every tensor the step touches lives at a fixed
address: batches are gathered into static buffers by index, augmentation parameters are
drawn on the host's seeded generator, a pass's worth at once, moved to the device once
per pass and copied into a static buffer per step, and the loss is summed on the
device. A NaN/inf is recorded on the device too (the first step it happened at) and
read at pass ends and evaluations, never every step.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from mnist_study.errors import Diverged
from mnist_study.training.augment import apply_affine, draw_affine
from mnist_study.training.config import TrainConfig

WARMUP_STEPS = 3  # eager steps on a side stream before capture, as CUDA graphs require


def autocast(cfg: TrainConfig, device: torch.device, graph: bool = False):
    """bf16 autocast, or none. In a CUDA graph without autocast's cache of cast weights,
    as PyTorch requires: a cached copy would be stale at every replay."""
    if cfg.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=not graph)
    return torch.autocast(device.type, enabled=False)


class Stepper:
    """A run's optimizer steps: a StaticStep per batch size (the last batch of a pass may
    be smaller: its own step, its own graph), made on first use. Checks for a non-finite
    loss at every pass end and whenever `steps` returns."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        x: torch.Tensor,
        y: torch.Tensor,
        cfg: TrainConfig,
        graph: bool,
    ):
        self.args = (model, optimizer, x, y, cfg)
        self.x, self.cfg, self.graph = x, cfg, graph
        self.totals = DeviceTotals(x.device)
        self.per_pass = math.ceil(len(x) / cfg.batch_size)
        self.by_size: dict[int, StaticStep] = {}
        self.done = 0
        self.pass_affine: torch.Tensor | None = None  # (4, images): this pass's draws

    def steps(
        self,
        batches: Iterator[tuple[int, torch.Tensor]],
        augment_rng: torch.Generator | None,
        count: int,
    ) -> float:
        """`count` steps on the next batches; the mean training loss over them."""
        self.args[0].train()
        for _ in range(count):
            _, idx = next(batches)
            size = len(idx)
            if size not in self.by_size:
                self.by_size[size] = StaticStep(*self.args, size, self.totals, self.graph)
            step = self.by_size[size]
            at = (self.done % self.per_pass) * self.cfg.batch_size  # first image of the batch
            if augment_rng is not None:
                if at == 0:
                    self.pass_affine = self.draw_pass(augment_rng)
                step.fill(idx, self.pass_affine[:, at : at + size])
            else:
                step.fill(idx, None)
            step.run()
            self.done += 1
            if self.done % self.per_pass == 0:
                self.check()
        self.check()
        return self.totals.take_mean_loss()

    def draw_pass(self, rng: torch.Generator) -> torch.Tensor:
        """A pass's augmentation parameters, the draws a step per batch would make, in
        one call and moved to the device at once: a copy from the host per step made
        every CUDA step wait for the device."""
        n, c = len(self.x), self.cfg
        sizes = [min(c.batch_size, n - start) for start in range(0, n, c.batch_size)]
        return draw_affine(sizes, rng, c.rotate_deg, c.shift, c.zoom).to(self.x.device)

    def check(self) -> None:
        bad = self.totals.first_bad()
        if bad is not None:
            step, loss = bad
            raise Diverged(math.ceil(step / self.per_pass), step, loss)


class StaticStep:
    """Optimizer steps of one batch size: `fill` a batch's indices, then `run`."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        x: torch.Tensor,
        y: torch.Tensor,
        cfg: TrainConfig,
        size: int,
        totals: DeviceTotals,
        graph: bool,
    ):
        self.model, self.optimizer, self.x, self.y, self.cfg = model, optimizer, x, y, cfg
        self.totals, device = totals, x.device
        self.idx = torch.zeros(size, dtype=torch.long, device=device)
        self.xb = torch.empty((size, *x.shape[1:]), device=device, dtype=x.dtype)
        self.xb = self.xb.contiguous(memory_format=torch.channels_last)
        self.yb = torch.empty(size, dtype=y.dtype, device=device)
        self.aug = None
        if cfg.augment:  # angle, scale, x and y shift: the identity until filled
            self.aug = torch.tensor([[0.0], [1.0], [0.0], [0.0]], device=device).repeat(1, size)
        self.capturing = False
        self.graph = self.capture() if graph else None

    def fill(self, idx: torch.Tensor, affine: torch.Tensor | None) -> None:
        """The batch's indices and, with augmentation, its (4, size) affine parameters,
        both already on the device."""
        self.idx.copy_(idx)
        if self.aug is not None:
            self.aug.copy_(affine)

    def run(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.body(set_to_none=True)

    def body(self, set_to_none: bool) -> None:
        """One step, in today's order: gather, augment, forward, zero grads, backward,
        update; then the device-side totals."""
        torch.index_select(self.x, 0, self.idx, out=self.xb)
        torch.index_select(self.y, 0, self.idx, out=self.yb)
        xb = self.xb if self.aug is None else apply_affine(self.xb, self.aug)
        with autocast(self.cfg, xb.device, graph=self.capturing):
            logits = self.model(xb.contiguous(memory_format=torch.channels_last))
            loss = F.cross_entropy(logits, self.yb)
        if set_to_none:
            self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.totals.add(loss.detach(), len(self.idx))

    def capture(self) -> torch.cuda.CUDAGraph:
        """Warm up on a side stream, undo the warm-up in place, capture one step."""
        saved = SavedState(self.model, self.optimizer, self.totals)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self.body(set_to_none=True)
        torch.cuda.current_stream().wait_stream(side)
        saved.restore()
        # Gradients set to None now are allocated from the graph's own pool by the
        # captured backward, which then writes them afresh at every replay.
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        self.capturing = True
        with torch.cuda.graph(graph):
            self.body(set_to_none=False)
        self.capturing = False
        return graph


class SavedState:
    """Model, optimizer and totals as they were, restored in place: a captured graph
    holds the addresses of these tensors, so they must stay the same objects."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, totals: DeviceTotals):
        self.model, self.optimizer, self.totals = model, optimizer, totals
        self.model_state = copy.deepcopy(model.state_dict())
        self.optimizer_state = {id(t): t.clone() for t in optimizer_tensors(optimizer)}
        self.totals_state = [t.clone() for t in totals.tensors()]

    def restore(self) -> None:
        self.model.load_state_dict(self.model_state)  # copies into the same tensors
        for t in optimizer_tensors(self.optimizer):
            old = self.optimizer_state.get(id(t))
            # State first made by the warm-up goes back to its fresh value: zero moments
            # and step count for Adam, a zero momentum buffer for SGD (whose first
            # step, with no dampening, then equals a fresh buffer's).
            if old is None:
                t.zero_()
            else:
                t.copy_(old)
        for t, old in zip(self.totals.tensors(), self.totals_state, strict=True):
            t.copy_(old)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]


class DeviceTotals:
    """Running loss and the first non-finite step, kept on the device between reads."""

    def __init__(self, device: torch.device, first_step: int = 1):
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.images = torch.zeros((), dtype=torch.float64, device=device)
        self.step = torch.full((), first_step - 1, dtype=torch.long, device=device)
        self.bad_step = torch.zeros((), dtype=torch.long, device=device)  # 0: none yet
        self.bad_loss = torch.zeros((), dtype=torch.float32, device=device)

    def add(self, loss: torch.Tensor, n: int) -> None:
        """In place only: inside a graph these are the captured addresses."""
        self.step.add_(1)
        first = (self.bad_step == 0) & ~torch.isfinite(loss)
        self.bad_step.copy_(torch.where(first, self.step, self.bad_step))
        self.bad_loss.copy_(torch.where(first, loss.float(), self.bad_loss))
        self.loss_sum.add_(loss.double() * n)
        self.images.add_(n)

    def take_mean_loss(self) -> float:
        """The mean loss since the last call, and start a new sum (one sync)."""
        mean = (self.loss_sum / self.images).item()
        self.loss_sum.zero_()
        self.images.zero_()
        return mean

    def first_bad(self) -> tuple[int, float] | None:
        """(step, loss) of the first non-finite loss so far, or None (one sync)."""
        step = int(self.bad_step.item())
        return (step, float(self.bad_loss.item())) if step else None

    def tensors(self) -> list[torch.Tensor]:
        return [self.loss_sum, self.images, self.step, self.bad_step, self.bad_loss]
