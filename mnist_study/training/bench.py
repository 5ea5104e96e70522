"""Side-by-side training throughput: the textbook PyTorch loop against our trainer.

All setups run on the same data and machine, interleaved over several rounds so that a
noisy neighbour hits them alike; the median round is reported. The textbook loop runs
in a fresh child process so that our trainer's heap setting (`keep_freed_memory`) does
not reach it: it runs as a user's script would.
"""

from __future__ import annotations

import json
import multiprocessing
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mnist_study.files import write_atomic
from mnist_study.training.config import TrainConfig
from mnist_study.training.machine import cpu_model, usable_cores
from mnist_study.training.mnist_data import MEAN, STD, load_splits
from mnist_study.training.model import SeedCNN, train_flops_per_image
from mnist_study.training.step import Stepper
from mnist_study.training.train import batch_order, build_model, keep_freed_memory, make_optimizer

WARMUP_STEPS = 20


def textbook_images_per_second(root: Path, steps: int, threads: int, device: str) -> float:
    """torchvision MNIST + DataLoader(64, shuffle) + ToTensor/Normalize, NCHW fp32, Adam;
    on a GPU each batch is moved there, as the tutorials do."""
    from torchvision import datasets, transforms

    torch.set_num_threads(threads)
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((MEAN,), (STD,))])
    loader = torch.utils.data.DataLoader(
        datasets.MNIST(root, train=True, download=False, transform=tf),
        batch_size=64,
        shuffle=True,
    )
    torch.manual_seed(0)
    # The seed's layer order (ReLU before pool), as a textbook would write it.
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(32, 64, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(3136, 128),
        torch.nn.ReLU(),
        torch.nn.Linear(128, 10),
    )
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    started, images = 0.0, 0
    for step, (x, y) in enumerate(loader):
        if step == WARMUP_STEPS:
            sync(device)
            started, images = time.perf_counter(), 0
        if step == WARMUP_STEPS + steps:
            break
        x, y = x.to(device), y.to(device)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        images += len(x)
    sync(device)
    return images / (time.perf_counter() - started)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def ours_images_per_second(
    splits, cfg: TrainConfig, steps: int, graph: bool = False, warmed_up=lambda: None
) -> float:
    """Our trainer's step (steps end in a sync, so the time is the device's too).
    `warmed_up()` is called between warm-up and timing (e.g. to start with others)."""
    device = splits.train_x.device
    if device.type == "cpu":
        keep_freed_memory()
    torch.manual_seed(0)
    model = build_model(cfg).to(device=device, memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, model, capturable=graph)
    order = torch.Generator().manual_seed(0)
    x, y = splits.train_x, splits.train_y
    batches = batch_order(len(x), cfg.batch_size, order, device)
    stepper = Stepper(model, optimizer, x, y, cfg, graph=graph)
    stepper.steps(batches, None, WARMUP_STEPS)  # includes a graph's capture
    warmed_up()
    started = time.perf_counter()
    stepper.steps(batches, None, steps)
    return steps * cfg.batch_size / (time.perf_counter() - started)


def matmul_gflops(size: int = 2048, repeats: int = 10) -> float:
    """Best fp32 GEMM rate on this CPU: the practical peak training is compared to."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = max(best, 2 * size**3 / (time.perf_counter() - started) / 1e9)
    return best


# (name, precision, batch, CUDA graph) per device type.
SETUPS = {
    "cpu": [
        ("ours fp32, batch 64", "fp32", 64, False),
        ("ours bf16, batch 64", "bf16", 64, False),
        ("ours fp32, batch 256", "fp32", 256, False),
        ("ours bf16, batch 256", "bf16", 256, False),
    ],
    "cuda": [
        ("ours eager fp32, batch 64", "fp32", 64, False),
        ("ours graph fp32, batch 64", "fp32", 64, True),
        ("ours eager bf16, batch 64", "bf16", 64, False),
        ("ours graph bf16, batch 64", "bf16", 64, True),
    ],
}


def study_wall_seconds(spec: Path, root: Path, workers: int) -> float:
    """Wall time of a whole study run (fresh stores in a temp dir) with `workers`, the
    cores shared out among them as threads per run (a study's runs take 1 thread
    unless told: 1 worker would then leave cores idle)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "mnist_study",
            "--data-root",
            str(root),
            "run",
            str(spec),
            "--workers",
            str(workers),
            "--threads",
            str(max(1, usable_cores() // workers)),
            "--quiet",
            "--tracking-uri",
            f"sqlite:///{tmp}/mlflow.db",
            "--storage",
            f"{tmp}/optuna.journal",
        ]
        started = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        return time.perf_counter() - started


# The whole textbook program, as a user would run it: torchvision MNIST, a DataLoader,
# one epoch of the seed's net with Adam, then test accuracy.
TEXTBOOK_SCRIPT = """
import sys, torch, torch.nn as nn, torch.nn.functional as F
from torchvision import datasets, transforms
tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
train = torch.utils.data.DataLoader(datasets.MNIST(sys.argv[1], train=True, transform=tf),
                                    batch_size=64, shuffle=True)
test = torch.utils.data.DataLoader(datasets.MNIST(sys.argv[1], train=False, transform=tf),
                                   batch_size=1000)
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Flatten(), nn.Linear(3136, 128), nn.ReLU(), nn.Linear(128, 10))
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
model.train()
for x, y in train:
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(); loss.backward(); opt.step()
model.eval(); correct = 0
with torch.no_grad():
    for x, y in test:
        correct += (model(x).argmax(1) == y).sum().item()
print(f"test acc {correct / 10000:.4f}")
"""


def process_seconds(root: Path, rounds: int) -> dict:
    """Wall time of whole processes, interleaved: the textbook program against
    `mnist-study train --epochs 1 --test` (imports, data, training, evaluation)."""
    commands = {
        "textbook program": [sys.executable, "-c", TEXTBOOK_SCRIPT, str(root)],
        "mnist-study train --epochs 1 --test": [
            sys.executable, "-m", "mnist_study", "--data-root", str(root),
            "train", "--epochs", "1", "--test",
        ],
    }  # fmt: skip
    walls: dict[str, list[float]] = {name: [] for name in commands}
    for r in range(1, rounds + 1):
        for name, cmd in commands.items():
            started = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            walls[name].append(time.perf_counter() - started)
        print(f"process round {r}/{rounds}: " + ", ".join(f"{w[-1]:.1f} s" for w in walls.values()))
    textbook, ours = walls.values()
    return {
        "textbook_s": round(statistics.median(textbook), 2),
        "ours_s": round(statistics.median(ours), 2),
        "speedup": round(statistics.median(t / o for t, o in zip(textbook, ours, strict=True)), 2),
    }


def study_workers(study: Path, root: Path) -> dict:
    """A whole study's wall time with 1, then 2 workers: one after the other, never at
    once, since each must have the whole machine."""
    walls = {n: study_wall_seconds(study, root, n) for n in (1, 2)}
    return {
        "spec": str(study),
        "wall_s_1_worker": round(walls[1], 1),
        "wall_s_2_workers": round(walls[2], 1),
        "speedup": round(walls[1] / walls[2], 2),
    }


def run_bench(
    root: Path,
    steps: int,
    rounds: int,
    json_path: Path | None,
    study: Path | None = None,
    processes: bool = False,
) -> dict:
    """Every setup of this machine's device (a CUDA GPU if present, else the CPU)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    splits = load_splits(root, TrainConfig()).to(torch.device(device))
    textbook = "textbook loop, fp32, batch 64"
    setups = SETUPS[device]
    samples: dict[str, list[float]] = {textbook: []} | {s[0]: [] for s in setups}
    peak = 0.0
    spawn = multiprocessing.get_context("spawn")
    with spawn.Pool(1) as child:
        for r in range(1, rounds + 1):
            samples[textbook].append(
                child.apply(
                    textbook_images_per_second, (root, steps, torch.get_num_threads(), device)
                )
            )
            for name, precision, batch, graph in setups:
                cfg = TrainConfig(precision=precision, batch_size=batch)
                # Same number of images per setup, so each gets a comparable slice of time.
                samples[name].append(
                    ours_images_per_second(splits, cfg, steps * 64 // batch, graph)
                )
            if device == "cpu":
                peak = max(peak, matmul_gflops())
            values = ", ".join(f"{v[-1]:,.0f}" for v in samples.values())
            print(f"round {r}/{rounds}: {values}")
    flops = train_flops_per_image(SeedCNN())
    rows = summary_rows(samples, textbook, flops, peak)
    machine = f"{cpu_model()}, {torch.get_num_threads()} threads"
    if device == "cuda":
        machine = f"{torch.cuda.get_device_name()} (host: {machine})"
    result = {
        "machine": machine,
        "torch": torch.__version__,
        "steps_at_batch_64": steps,
        "rounds": rounds,
        "train_mflop_per_image": round(flops / 1e6, 1),
        "fp32_matmul_gflops": round(peak, 1),
        "rows": rows,
    }
    if study is not None:
        result["study_workers"] = study_workers(study, root)
    if processes:
        result["processes"] = process_seconds(root, rounds)
    print(format_table(result))
    if json_path is not None:
        write_atomic(json_path, json.dumps(result, indent=2) + "\n")
        print(f"wrote {json_path}")
    return result


def summary_rows(
    samples: dict[str, list[float]], textbook: str, flops: float, peak: float
) -> list[dict]:
    """Per setup: the median images/s, its ratio to the textbook loop (within each round,
    measured side by side, then the median over rounds), its share of the fp32 peak."""
    rows = []
    for name, values in samples.items():
        ips = statistics.median(values)
        share = ips * flops / 1e9 / peak if "fp32" in name and peak else None
        ratio = statistics.median(v / t for v, t in zip(values, samples[textbook], strict=True))
        rows.append(
            {
                "setup": name,
                "images_per_s": round(ips),
                "speedup": round(ratio, 2),
                "fp32_peak_share": None if share is None else round(share, 3),
            }
        )
    return rows


def format_table(result: dict) -> str:
    lines = [
        f"Machine: {result['machine']}; torch {result['torch']}; median of "
        f"{result['rounds']} rounds of {result['steps_at_batch_64'] * 64:,} images each.",
        f"fp32 peak = best 2048^2 fp32 matmul in this run: {result['fp32_matmul_gflops']} "
        f"GFLOP/s; training = {result['train_mflop_per_image']} MFLOP/image."
        if result["fp32_matmul_gflops"]
        else f"Training = {result['train_mflop_per_image']} MFLOP/image.",
        "",
        "Speed-up: the ratio to the textbook loop within each round, median over rounds.",
        "",
        "| setup | images/s | vs textbook | share of fp32 peak |",
        "|---|---:|---:|---:|",
    ]
    for row in result["rows"]:
        share = "" if row["fp32_peak_share"] is None else f"{row['fp32_peak_share']:.0%}"
        lines.append(
            f"| {row['setup']} | {row['images_per_s']:,} | {row['speedup']:.2f}x | {share} |"
        )
    if "study_workers" in result:
        w = result["study_workers"]
        lines += [
            "",
            f"Study wall time, {w['spec']}: 1 worker {w['wall_s_1_worker']:.0f} s, "
            f"2 workers {w['wall_s_2_workers']:.0f} s ({w['speedup']:.2f}x).",
        ]
    if "processes" in result:
        p = result["processes"]
        lines += [
            "",
            f"Whole processes, 1 epoch and the test set (median of {result['rounds']}): "
            f"textbook program {p['textbook_s']:.1f} s, mnist-study train {p['ours_s']:.1f} s "
            f"({p['speedup']:.2f}x).",
        ]
    return "\n".join(lines)
