"""Is bf16 as accurate as fp32 on this CPU? The seed's setup trained in both precisions
for the same seeds (same initialization and batch order, so the runs pair up), then a
paired equivalence test (TOST) of their test accuracy within a stated margin."""

from __future__ import annotations

import time
from pathlib import Path

from mnist_study.analysis.significance import paired_tost
from mnist_study.training.config import TrainConfig
from mnist_study.training.mnist_data import load_splits
from mnist_study.training.train import evaluate_test, fit


def compare_precisions(root: Path, seeds: int, margin: float) -> dict:
    splits = load_splits(root, TrainConfig())
    accs: dict[str, list[float]] = {"fp32": [], "bf16": []}
    seconds: dict[str, float] = {"fp32": 0.0, "bf16": 0.0}
    for seed in range(seeds):
        for precision in accs:  # interleaved, so a noisy stretch hits both alike
            cfg = TrainConfig(seed=seed, precision=precision)
            started = time.perf_counter()
            model = fit(cfg, splits).model
            seconds[precision] += time.perf_counter() - started
            accs[precision].append(evaluate_test(model, splits, cfg)["test_acc"])
            print(f"seed {seed} {precision}: test acc {accs[precision][-1]:.4f}", flush=True)
    diff, half, p = paired_tost(accs["bf16"], accs["fp32"], margin)
    result = {
        "seeds": seeds,
        "margin_points": margin * 100,
        "fp32_mean": sum(accs["fp32"]) / seeds,
        "bf16_mean": sum(accs["bf16"]) / seeds,
        "diff_points": diff * 100,
        "ci90_half_width_points": half * 100,
        "tost_p": p,
        "equivalent": p < 0.05,
        "train_seconds": seconds,
        "accs": accs,
    }
    verdict = "equivalent" if p < 0.05 else "not shown equivalent"
    print(
        f"{seeds} seeds, seed setup (5 epochs, batch 64, Adam 1e-3): fp32 "
        f"{result['fp32_mean']:.2%}, bf16 {result['bf16_mean']:.2%}; bf16 - fp32 = "
        f"{diff * 100:+.3f} ± {half * 100:.3f} points (90% CI, paired); TOST at ±{margin * 100:g} "
        f"points: p = {p:.3g}, {verdict}. Training time: fp32 {seconds['fp32']:.0f} s, "
        f"bf16 {seconds['bf16']:.0f} s."
    )
    return result
