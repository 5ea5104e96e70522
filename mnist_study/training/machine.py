"""Facts about the machine a run trains on: its CPU, the cores this process may use, the
memory free; recorded with runs and benchmarks, and used to size a study's workers."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import psutil


def available_memory() -> int:
    """Bytes the OS could give new processes without swapping (Linux: MemAvailable)."""
    return psutil.virtual_memory().available


def cpu_model() -> str:
    """The CPU's name, core count, family and model, and the kernels PyTorch dispatches
    to on it, for provenance and benchmarks. A VM may name two processors alike ("AMD
    EPYC"); the kernels (AVX2, AVX512) decide the rounding, so a study's numbers follow
    them: on one CPU, forcing ATen's scalar kernels changed which trial won a tuning."""
    import torch

    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    kind = f"family {fields['cpu family']} model {fields['model']}, " if "model" in fields else ""
    kernels = torch.backends.cpu.get_cpu_capability()
    return f"{name} x{os.cpu_count()} ({kind}{kernels} kernels)"


def usable_cores() -> int:
    """The cores this process may run on (its affinity; macOS has none: all), at least 1."""
    affinity = psutil.Process().cpu_affinity() if hasattr(psutil.Process, "cpu_affinity") else []
    return max(1, len(affinity) or psutil.cpu_count() or 1)
