#!/usr/bin/env bash
# Issue 10's GPU checks in one go, on a machine with a CUDA GPU and no registry. From the
# project root, after `bash ../shared/gpu/make-bundle.sh` here, on the GPU machine:
#   OUT=some/dir bash .gpu/run.sh bash scripts/gpu-checks.sh
# Writes into $OUT: gpu_checks.json (variants, graph vs eager, divergence, processes per
# GPU), bench.json (textbook vs ours), the ablation study's time, stores and report.
set -u
out=${OUT:?set OUT to a folder for the results}
mkdir -p "$out"
spec=${SPEC:-experiments/ablations.toml}  # SPEC=experiments/smoke.toml: a dry run
step() { echo "== $1 ($(date +%T))"; }
step "checks"
timeout 200 python3 scripts/gpu_checks.py "$out" ${CHECK_ARGS:-} 2>&1 | tee "$out/gpu_checks.log"
step "bench"
timeout 90 python3 -m mnist_study bench --rounds 3 --json "$out/bench.json" 2>&1 | tee "$out/bench.log"
step "ablations, --workers auto"
store=$(mktemp -d)
started=$(date +%s%N)
timeout 200 python3 -m mnist_study run "$spec" --workers auto --quiet \
  --tracking-uri "sqlite:///$store/mlflow.db" --storage "$store/optuna.journal" 2>&1 \
  | tee "$out/ablations.log" | grep -v '^  ' | tail -40
echo "ablations exit ${PIPESTATUS[0]}, wall $(( ($(date +%s%N) - started) / 1000000 )) ms" | tee -a "$out/ablations.log"
python3 -m mnist_study report "$spec" --tracking-uri "sqlite:///$store/mlflow.db" \
  --storage "$store/optuna.journal" --out "$out/reports" 2>&1 | tail -5
cp "$store/mlflow.db" "$store/optuna.journal" "$out/" 2>/dev/null
step "done"
