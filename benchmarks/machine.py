"""The CPU a benchmark ran on, named the same way in every results file.

The CPU machine's class varies between sessions (a 2-core AMD EPYC with AVX2,
a 2-core Intel Xeon with AVX-512 BF16 / FP16 / VNNI and AMX), and a figure is
read only against ratios from one run on one class: each benchmark's header
names the CPU, its core count and the vector extensions that set the classes
apart through `cpu_name()`. Neighbours: every script in benchmarks/ that
writes a results file.
"""
from __future__ import annotations

import os
import platform

# /proc/cpuinfo flag -> the name a reader knows it by, widest last
_EXTENSIONS = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_vnni": "VNNI", "avx512_bf16": "BF16",
               "avx512_fp16": "FP16", "amx_tile": "AMX"}


def _cpuinfo() -> tuple[str, set[str]]:
    """The first processor's model name and flags (empty where /proc is not Linux's)."""
    name, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not name:
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return name, flags


def cpu_name() -> str:
    """e.g. "Intel(R) Xeon(R) Processor, 2 cores (AVX2 AVX-512 VNNI BF16 FP16 AMX)"."""
    name, flags = _cpuinfo()
    name = name or platform.processor() or platform.machine() or "unknown CPU"
    extensions = " ".join(label for flag, label in _EXTENSIONS.items() if flag in flags)
    return f"{name}, {os.cpu_count()} cores" + (f" ({extensions})" if extensions else "")
