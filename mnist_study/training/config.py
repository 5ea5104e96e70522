"""The one typed configuration of a training run. Every default lives here.

A variant in an experiment file, or a flag of `mnist-study train`, states only the
fields it changes; `TrainConfig.replace` refuses unknown keys, wrong types and values
out of range, in one line that names the source, the key, the value and what is right.
"""

from __future__ import annotations

import datetime
import reprlib
import typing

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mnist_study.errors import ConfigError

MNIST_TRAIN_IMAGES = 60_000
MNIST_TEST_IMAGES = 10_000
SEED_MAX = 2**32 - 1  # numpy's limit; torch's is wider

# Strict: TOML's `1` is no bool and `true` no int; an int is accepted where a float is.
SCHEMA = ConfigDict(frozen=True, extra="forbid", strict=True, use_attribute_docstrings=True)


class TrainConfig(BaseModel):
    """Every numeric field has bounds that make sense for MNIST on one machine, so that
    a typo cannot run forever or train nothing."""

    model_config = SCHEMA

    # --- model (scientific switches) ---
    batchnorm: bool = False
    """BatchNorm2d after each convolution, before its ReLU."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout rate on the inputs of both fully connected layers (0 = off)."""
    convs_per_block: int = Field(1, ge=1, le=8)
    """3x3 convolutions per block (the seed has 1); 2 makes the 'deeper' net."""

    # --- optimizer ---
    optimizer: typing.Literal["adam", "sgd"] = "adam"
    """'adam' (decoupled weight decay, i.e. AdamW) or 'sgd' (with momentum)."""
    lr: float = Field(1e-3, gt=0.0, le=10.0)
    """Learning rate, constant over training as in the seed."""
    weight_decay: float = Field(0.0, ge=0.0, le=10.0)
    """Weight decay; decoupled for Adam (AdamW), L2 for SGD."""
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    """SGD momentum (ignored by Adam)."""
    nesterov: bool = False
    """Nesterov momentum for SGD."""

    # --- data augmentation (training batches only) ---
    augment: bool = False
    """Random rotation, translation and zoom, independent per image."""
    rotate_deg: float = Field(10.0, ge=0.0, le=180.0)
    """Maximum rotation in degrees, either way."""
    shift: float = Field(0.1, ge=0.0, le=0.5)
    """Maximum translation as a fraction of the image side, either way."""
    zoom: float = Field(0.1, ge=0.0, le=0.9)
    """Maximum relative change of scale, either way."""

    # --- data ---
    train_size: int = Field(55_000, ge=10, le=MNIST_TRAIN_IMAGES - 10)
    """Training images drawn (stratified) from the 55,000 left after validation."""
    val_size: int = Field(5_000, ge=10, le=MNIST_TRAIN_IMAGES - 10)
    """Validation images held out (stratified) of the 60,000 training images."""
    train_eval_size: int = Field(10_000, ge=10, le=MNIST_TRAIN_IMAGES)
    """Fixed subset of the training split measured each epoch for train_loss/acc."""
    test_size: int = Field(MNIST_TEST_IMAGES, ge=10, le=MNIST_TEST_IMAGES)
    """Test images a final run is scored on: all 10,000, or a fixed stratified subset
    (only to shrink a study, as the tests do: scoring all takes seconds a run)."""
    split_seed: int = Field(0, ge=0, le=SEED_MAX)
    """Seed of the train/validation split; fixed so that every run sees the same split."""

    # --- training ---
    epochs: int = Field(5, ge=1, le=1000)
    """Passes over the training split (unless `steps` is set)."""
    steps: int = Field(0, ge=0, le=1_000_000)
    """Optimizer steps to train for, whatever the training-set size (0: use `epochs`)."""
    evals: int = Field(0, ge=0, le=1000)
    """Evaluations spread evenly over training, each an MLflow step indexed by optimizer
    step (0: one per epoch, indexed by epoch)."""
    batch_size: int = Field(64, ge=1, le=8192)
    """Images per optimizer step."""
    seed: int = Field(0, ge=0, le=SEED_MAX)
    """Seed for weight init, batch order and augmentation."""
    precision: typing.Literal["fp32", "bf16"] = "fp32"
    """fp32, or bf16 autocast (CPUs with AMX, CUDA); fp32 is the measured default."""
    device: typing.Literal["auto", "cpu", "cuda"] = "auto"
    """'auto' (CUDA when present), 'cpu' or 'cuda'."""
    cuda_graph: bool = True
    """On CUDA, capture the training step as a CUDA graph and replay it (no effect on
    a CPU); false runs it eagerly."""
    threads: int = Field(1, ge=0, le=1024)
    """CPU threads per run: 1, as a study runs its runs side by side on the cores; 0: one
    per core (torch's default), for a lone `train` on an idle machine."""

    @model_validator(mode="after")
    def _fits_mnist(self) -> TrainConfig:
        if self.val_size + self.train_size > MNIST_TRAIN_IMAGES:
            raise ValueError(
                f"train_size = {self.train_size}; must be <= "
                f"{MNIST_TRAIN_IMAGES - self.val_size} (60,000 minus val_size {self.val_size})"
            )
        return self

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
        """A copy with `changes` applied; a bad key or value raises ConfigError."""
        return validated(TrainConfig, source, self.as_params() | changes)

    def as_params(self) -> dict[str, object]:
        return self.model_dump()


def field_docs() -> dict[str, str]:
    """Each field's docstring, for --help and the README."""
    return {k: f.description or "" for k, f in TrainConfig.model_fields.items()}


Model = typing.TypeVar("Model", bound=BaseModel)
OUT_OF_RANGE = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}


def validated(model: type[Model], source: str, values: object, prefix: str = "") -> Model:
    """`model` from `values`, or ConfigError in one line: pydantic finds the problem, this
    says it the way every message of the tool does (`source: key = value; must be ...`)."""
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(refusal(model, source, exc.errors()[0], prefix)) from None


SHORT = reprlib.Repr()  # keyword arguments only from Python 3.12
SHORT.maxstring = SHORT.maxother = 60
SHORT.maxlist = SHORT.maxtuple = 8


class Shown:
    """A value as a refusal shows it: its repr, cut short (a list of 10,000 seeds); a
    TOML date or time as it was written."""

    def __init__(self, value: object):
        self.value = value

    def __repr__(self) -> str:
        if isinstance(self.value, datetime.date | datetime.time):
            return self.value.isoformat()
        return SHORT.repr(self.value)


def refusal(model: type[BaseModel], source: str, error: dict, prefix: str) -> str:
    loc = error["loc"]
    key = prefix + ".".join(map(str, loc))
    field = model.model_fields.get(str(loc[0])) if loc else None
    raw, kind = error.get("input"), error["type"]
    value = Shown(raw)
    if kind == "extra_forbidden":
        allowed = ", ".join(sorted(model.model_fields))
        return f"{source}: unknown key '{key}'; allowed: {allowed}"
    if kind == "value_error":  # the model's own checks say what is right
        said = str(error["ctx"]["error"])
        return f"{source}: {key} = {value!r}; {said}" if loc else f"{source}: {said}"
    if kind == "missing" and field is not None and field.description:
        return f"{source}: {key}: missing ({field.description.rstrip('.')})"
    if field is None or kind == "missing":
        return f"{source}: {key}: {error['msg'].lower()}"
    if kind in OUT_OF_RANGE:
        return f"{source}: {key} = {value!r}; must be in {interval(field.metadata)}"
    if kind == "literal_error":
        allowed = ", ".join(map(repr, typing.get_args(field.annotation)))
        return f"{source}: {key} = {value!r}; must be one of {allowed}"
    want = getattr(field.annotation, "__name__", str(field.annotation))
    want = {"dict": "a table", "tuple": "a list"}.get(want, want)  # as TOML says them
    return f"{source}: {key} = {value!r} is {type(raw).__name__}; must be {want}"


def interval(bounds: list) -> str:
    """`[0, 1)` from a field's ge/gt/le/lt."""
    ends = {type(b).__name__: getattr(b, type(b).__name__.lower()) for b in bounds}
    low, high = ends.get("Ge", ends.get("Gt")), ends.get("Le", ends.get("Lt"))
    text = ", ".join(str(e) if isinstance(e, int) else f"{e:g}" for e in (low, high))
    return f"{'(' if 'Gt' in ends else '['}{text}{')' if 'Lt' in ends else ']'}"
