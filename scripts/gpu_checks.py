"""The GPU checks that need more than `mnist-study bench`: every variant
trains as a CUDA graph, graph and eager end at the same accuracy, a diverged run is
caught with its epoch, and how many processes keep one GPU busy.

Run by scripts/gpu-checks.sh; alone: python3 scripts/gpu_checks.py OUT_DIR [--device cpu]
(on a CPU, `--device cpu --tiny` checks only that the script runs).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
from dataclasses import replace
from pathlib import Path

import torch

from mnist_study.errors import Diverged
from mnist_study.training.bench import ours_images_per_second
from mnist_study.training.config import TrainConfig
from mnist_study.training.mnist_data import load_splits
from mnist_study.training.train import train

# One setting per variant of experiments/ablations.toml, at a typical tuned point.
VARIANTS = {
    "baseline": {},
    "batchnorm": {"batchnorm": True},
    "dropout": {"dropout": 0.3},
    "weight_decay": {"weight_decay": 0.03},
    "sgd_momentum": {"optimizer": "sgd", "nesterov": True, "lr": 0.05, "momentum": 0.9},
    "augmentation": {"augment": True},
    "deeper": {"convs_per_block": 2},
    "combined": {"batchnorm": True, "augment": True, "dropout": 0.3, "weight_decay": 0.03},
}


def variants(base: TrainConfig) -> dict:
    """Each variant for one epoch as a graph: epoch time and validation accuracy."""
    rows = {}
    for name, changes in VARIANTS.items():
        history = train(replace(base, **changes), load_splits(ROOT, base)).history
        rows[name] = {
            "epoch_s": round(history[-1]["train_seconds"], 3),
            "val_acc": history[-1]["val_acc"],
        }
        print(f"variant {name}: {rows[name]}", flush=True)
    return rows


def graph_vs_eager(base: TrainConfig, seeds: list[int], epochs: int) -> dict:
    """Same seeds, graph and eager: final validation accuracy and epoch times."""
    out = {}
    for graph in (True, False):
        accs, secs = [], []
        for seed in seeds:
            cfg = replace(base, seed=seed, epochs=epochs, cuda_graph=graph)
            history = train(cfg, load_splits(ROOT, cfg)).history
            accs.append(history[-1]["val_acc"])
            secs += [h["train_seconds"] for h in history[1:]]  # the first includes capture
        out["graph" if graph else "eager"] = {
            "val_acc": accs,
            "epoch_s_median": round(statistics.median(secs or [0.0]), 3),
        }
        print(f"graph={graph}: {out['graph' if graph else 'eager']}", flush=True)
    diffs = [g - e for g, e in zip(out["graph"]["val_acc"], out["eager"]["val_acc"], strict=True)]
    out["paired_diff_points"] = [round(100 * d, 3) for d in diffs]
    out["between_seed_sd_points"] = round(100 * statistics.stdev(out["eager"]["val_acc"]), 3)
    return out


def divergence(base: TrainConfig) -> str:
    try:
        train(replace(base, optimizer="sgd", lr=1e12, epochs=2), load_splits(ROOT, base))
    except Diverged as exc:
        return f"caught: {exc} (epoch {exc.epoch})"
    return "NOT caught"


def one_process(root: Path, base: TrainConfig, steps: int, barrier, results) -> None:
    """Train `steps` graph steps after a warm-up, starting with the others at a barrier
    (a spawned process: `root` passed, as ROOT is set only in the parent)."""
    splits = load_splits(root, base).to(torch.device(base.device))
    graph = base.device == "cuda"
    rate = ours_images_per_second(splits, base, steps, graph, warmed_up=barrier.wait)
    results.put((rate, torch.cuda.max_memory_reserved() if graph else 0))


def scaling(base: TrainConfig, counts: list[int], steps: int) -> dict:
    """N processes training at once: summed images/s and each one's epoch time."""
    ctx = multiprocessing.get_context("spawn")
    out = {}
    for n in counts:
        barrier, results = ctx.Barrier(n), ctx.Queue()
        args = (ROOT, base, steps, barrier, results)
        procs = [ctx.Process(target=one_process, args=args) for _ in range(n)]
        for p in procs:
            p.start()
        got = [results.get() for _ in procs]
        for p in procs:
            p.join()
        rates = [r for r, _ in got]
        out[n] = {
            "total_images_per_s": round(sum(rates)),
            "epoch_s_each": round(55_000 / statistics.mean(rates), 3),
            "gpu_memory_reserved_mb_each": round(max(m for _, m in got) / 2**20),
        }
        print(f"{n} processes: {out[n]}", flush=True)
    return out


def main() -> None:
    global ROOT
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a few steps: only that it runs")
    parser.add_argument("--data-root", type=Path, default=Path("data"))
    parser.add_argument("--sections", nargs="+", help="only these (default: all)")
    args = parser.parse_args()
    ROOT = args.data_root
    base = TrainConfig(device=args.device, epochs=1)
    if args.tiny:
        base = replace(base, train_size=2000, val_size=1000, train_eval_size=500)
    result = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"}
    result["torch"] = torch.__version__
    args.out.mkdir(parents=True, exist_ok=True)
    seeds, counts = ([0, 1], [1, 2]) if args.tiny else ([0, 1, 2, 3], [1, 2, 4, 6, 8])
    sections = {
        "divergence": lambda: divergence(base),
        "variants": lambda: variants(base),
        "graph_vs_eager": lambda: graph_vs_eager(base, seeds, 3),
        "scaling": lambda: scaling(base, counts, 10 if args.tiny else 860),
    }
    for name, measure in sections.items():
        if args.sections and name not in args.sections:
            continue
        result[name] = measure()
        print(f"{name}: {result[name]}", flush=True)
        # After each section, so that a timeout keeps what was measured.
        (args.out / "gpu_checks.json").write_text(json.dumps(result, indent=2) + "\n")


ROOT = Path("data")

if __name__ == "__main__":
    main()
