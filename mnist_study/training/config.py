"""The one typed configuration of a training run. Every default lives here.

A variant in an experiment file, or a flag of `mnist-study train`, states only the
fields it changes; `TrainConfig.replace` refuses unknown keys and wrong types.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass

from mnist_study.errors import ConfigError

MNIST_TRAIN_IMAGES = 60_000
MNIST_TEST_IMAGES = 10_000
SEED_MAX = 2**32 - 1  # numpy's limit; torch's is wider

# (low, high, low excluded, high excluded) of every numeric field: bounds that make
# sense for MNIST on one machine, so that a typo cannot run forever or train nothing.
RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "dropout": (0.0, 1.0, False, True),
    "convs_per_block": (1, 8, False, False),
    "lr": (0.0, 10.0, True, False),
    "weight_decay": (0.0, 10.0, False, False),
    "momentum": (0.0, 1.0, False, True),
    "rotate_deg": (0.0, 180.0, False, False),
    "shift": (0.0, 0.5, False, False),
    "zoom": (0.0, 0.9, False, False),
    "train_size": (10, MNIST_TRAIN_IMAGES - 10, False, False),
    "val_size": (10, MNIST_TRAIN_IMAGES - 10, False, False),
    "train_eval_size": (10, MNIST_TRAIN_IMAGES, False, False),
    "test_size": (10, MNIST_TEST_IMAGES, False, False),
    "split_seed": (0, SEED_MAX, False, False),
    "epochs": (1, 1000, False, False),
    "steps": (0, 1_000_000, False, False),
    "evals": (0, 1000, False, False),
    "batch_size": (1, 8192, False, False),
    "seed": (0, SEED_MAX, False, False),
    "threads": (0, 1024, False, False),
}


@dataclass(frozen=True)
class TrainConfig:
    # --- model (scientific switches) ---
    batchnorm: bool = False
    """BatchNorm2d after each convolution, before its ReLU."""
    dropout: float = 0.0
    """Dropout rate on the inputs of both fully connected layers (0 = off)."""
    convs_per_block: int = 1
    """3x3 convolutions per block (the seed has 1); 2 makes the 'deeper' net."""

    # --- optimizer ---
    optimizer: typing.Literal["adam", "sgd"] = "adam"
    """'adam' (decoupled weight decay, i.e. AdamW) or 'sgd' (with momentum)."""
    lr: float = 1e-3
    """Learning rate, constant over training as in the seed."""
    weight_decay: float = 0.0
    """Weight decay; decoupled for Adam (AdamW), L2 for SGD."""
    momentum: float = 0.9
    """SGD momentum (ignored by Adam)."""
    nesterov: bool = False
    """Nesterov momentum for SGD."""

    # --- data augmentation (training batches only) ---
    augment: bool = False
    """Random rotation, translation and zoom, independent per image."""
    rotate_deg: float = 10.0
    """Maximum rotation in degrees, either way."""
    shift: float = 0.1
    """Maximum translation as a fraction of the image side, either way."""
    zoom: float = 0.1
    """Maximum relative change of scale, either way."""

    # --- data ---
    train_size: int = 55_000
    """Training images drawn (stratified) from the 55,000 left after validation."""
    val_size: int = 5_000
    """Validation images held out (stratified) of the 60,000 training images."""
    train_eval_size: int = 10_000
    """Fixed subset of the training split measured each epoch for train_loss/acc."""
    test_size: int = MNIST_TEST_IMAGES
    """Test images a final run is scored on: all 10,000, or a fixed stratified subset
    (only to shrink a study, as the tests do: scoring all takes seconds a run)."""
    split_seed: int = 0
    """Seed of the train/validation split; fixed so that every run sees the same split."""

    # --- training ---
    epochs: int = 5
    """Passes over the training split (unless `steps` is set)."""
    steps: int = 0
    """Optimizer steps to train for, whatever the training-set size (0: use `epochs`)."""
    evals: int = 0
    """Evaluations spread evenly over training, each an MLflow step indexed by optimizer
    step (0: one per epoch, indexed by epoch)."""
    batch_size: int = 64
    """Images per optimizer step."""
    seed: int = 0
    """Seed for weight init, batch order and augmentation."""
    precision: typing.Literal["fp32", "bf16"] = "fp32"
    """fp32, or bf16 autocast (CPUs with AMX, CUDA); fp32 is the measured default."""
    device: str = "auto"
    """'auto' (CUDA when present), 'cpu' or 'cuda'."""
    cuda_graph: bool = True
    """On CUDA, capture the training step as a CUDA graph and replay it (no effect on
    a CPU); false runs it eagerly."""
    threads: int = 0
    """CPU threads for torch (0 = torch's default: one per core)."""

    @property
    def axis(self) -> str:
        """What a run's evaluation points count, the one word every console line, table
        and figure uses: "step" (optimizer steps, with `steps` or `evals`) or "epoch"."""
        return "step" if self.steps or self.evals else "epoch"

    @property
    def length(self) -> str:
        """How long a run trains, as the console and the reports say it."""
        return f"{self.steps} optimizer steps" if self.steps else f"{self.epochs} epochs"

    def replace(self, source: str = "config", **changes: object) -> TrainConfig:
        """A copy with `changes` applied; unknown keys and wrong types raise ConfigError."""
        hints = typing.get_type_hints(TrainConfig)
        for key, value in changes.items():
            if key not in hints:
                raise ConfigError(
                    f"{source}: unknown key {key!r}; allowed: {', '.join(sorted(hints))}"
                )
            changes[key] = coerce(source, key, value, hints[key])
        cfg = dataclasses.replace(self, **changes)
        cfg.validate(source)
        return cfg

    def validate(self, source: str = "config") -> None:
        """Every numeric field within RANGES and finite; names the first bad one."""
        for key, (low, high, low_open, high_open) in RANGES.items():
            value = getattr(self, key)
            below = value <= low if low_open else value < low
            above = value >= high if high_open else value > high
            if not math.isfinite(value) or below or above:
                ends = ", ".join(str(e) if isinstance(e, int) else f"{e:g}" for e in (low, high))
                interval = f"{'(' if low_open else '['}{ends}{')' if high_open else ']'}"
                raise ConfigError(f"{source}: {key} = {value!r}; must be in {interval}")
        if self.val_size + self.train_size > MNIST_TRAIN_IMAGES:
            raise ConfigError(
                f"{source}: train_size = {self.train_size}; must be <= "
                f"{MNIST_TRAIN_IMAGES - self.val_size} (60,000 minus val_size {self.val_size})"
            )
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(
                f"{source}: device = {self.device!r}; must be 'auto', 'cpu' or 'cuda'"
            )

    def as_params(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def coerce(source: str, key: str, value: object, hint: object) -> object:
    """Check `value` against the field's type; ints are accepted where floats are."""
    if typing.get_origin(hint) is typing.Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(
                f"{source}: {key} = {value!r}; must be one of {', '.join(map(repr, allowed))}"
            )
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    # bool is an int subclass: refuse `true` for an int field and `1` for a bool field.
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(
            f"{source}: {key} = {value!r} is {type(value).__name__}; must be {hint.__name__}"
        )
    return value


def field_docs() -> dict[str, str]:
    """Each field's docstring (the string literal under it), for --help and the README."""
    import ast
    import inspect
    import textwrap

    body = ast.parse(textwrap.dedent(inspect.getsource(TrainConfig))).body[0].body
    docs = {}
    for node, after in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr):
            docs[node.target.id] = after.value.value
    return docs
