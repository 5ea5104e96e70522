#!/usr/bin/env bash
# The GPU checks of docs/speed.md in one go, on a machine with a CUDA GPU whose python3
# has the project's packages (torch with CUDA, mlflow, optuna, pandas, matplotlib,
# scipy) and MNIST in data/. From the project root:
#   OUT=some/dir bash scripts/gpu-checks.sh
# Writes into $OUT: gpu_checks.json (variants, graph vs eager, divergence, processes per
# GPU), bench.json (textbook vs ours), and per worker count the ablation study's wall
# time and log; the first count's stores and report too. Options (environment):
# CHECK_ARGS (e.g. "--sections variants scaling"), BENCH=0, WORKERS="auto 2" (a study
# run per count), STUDY_TIMEOUT=200 (s), SPEC=experiments/smoke.toml (a dry run).
set -u
out=${OUT:?set OUT to a folder for the results}
mkdir -p "$out"
spec=${SPEC:-experiments/ablations.toml}
step() { echo "== $1 ($(date +%T))"; }
step "checks"
timeout 200 python3 scripts/gpu_checks.py "$out" ${CHECK_ARGS:-} 2>&1 | tee "$out/gpu_checks.log"
if [ "${BENCH:-1}" = 1 ]; then
  step "bench"
  timeout 90 python3 -m mnist_study bench --rounds 3 --json "$out/bench.json" 2>&1 | tee "$out/bench.log"
fi
first=1
for workers in ${WORKERS:-auto}; do
  step "study, --workers $workers"
  store=$(mktemp -d)
  started=$(date +%s%N)
  timeout ${STUDY_TIMEOUT:-200} python3 -m mnist_study run "$spec" --workers "$workers" --quiet \
    --tracking-uri "sqlite:///$store/mlflow.db" --storage "$store/optuna.journal" \
    > "$out/study-workers-$workers.log" 2>&1
  echo "study --workers $workers: exit $?, wall $(( ($(date +%s%N) - started) / 1000000 )) ms" \
    | tee -a "$out/study-workers-$workers.log" "$out/study-walls.txt"
  grep -E '^(--workers|study|[a-z_]+: done)' "$out/study-workers-$workers.log"
  if [ $first = 1 ]; then
    python3 -m mnist_study report "$spec" --tracking-uri "sqlite:///$store/mlflow.db" \
      --storage "$store/optuna.journal" --out "$out/reports" 2>&1 | tail -2
    cp "$store/mlflow.db" "$store/optuna.journal" "$out/"
    first=0
  fi
done
step "done"
