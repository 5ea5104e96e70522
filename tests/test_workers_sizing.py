"""How many workers and threads a study starts on this machine, and the line that says
so when asked for more than it holds."""

from __future__ import annotations

import os
from pathlib import Path

from mnist_study.study.run_options import GPU_WORKERS, auto_workers, cap_workers, worker_cap


def test_workers_auto_is_within_the_machine():
    """One per core this process may use, as many as the free memory holds (read here
    from the kernel, not through the code under test), at least one."""
    from mnist_study.study.run_options import WORKER_MEMORY_BYTES

    cores = len(os.sched_getaffinity(0))
    meminfo = dict(line.split(":") for line in Path("/proc/meminfo").read_text().splitlines())
    free = int(meminfo["MemAvailable"].split()[0]) * 1024
    held = max(1, min(cores, free // WORKER_MEMORY_BYTES))
    on_cpu, why = auto_workers(cuda=False)
    assert abs(on_cpu - held) <= 1 and "per core" in why  # memory moves between reads
    on_gpu, _ = auto_workers(cuda=True)
    assert 1 <= on_gpu <= min(on_cpu, GPU_WORKERS)


def test_workers_are_capped_to_what_the_machine_holds(capsys):
    cap, why = worker_cap()
    assert 1 <= cap <= (os.cpu_count() or 1)
    assert cap_workers(10_000) == cap
    line = capsys.readouterr().out
    assert line.startswith(f"--workers 10000: this machine holds {cap} ({why})")
    assert cap_workers(1) == 1


def test_threads_are_capped_to_the_cores_and_default_to_one(capsys):
    """`--threads 1000` on 2 cores ran 14x slower: capped, with a line, like --workers."""
    from mnist_study.study.run_options import cap_threads

    cores = len(os.sched_getaffinity(0))
    assert cap_threads(1000) == cores
    assert (
        capsys.readouterr().out
        == f"--threads 1000: this machine has {cores} cores; using {cores}\n"
    )
    assert cap_threads(1) == 1 and cap_threads(0) == 0  # 0: one per core
    assert cap_threads(None) is None  # unset: the spec's
