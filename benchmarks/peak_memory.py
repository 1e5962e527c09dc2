"""Peak resident memory for the memory benchmarks: read it, restart it, and
charge each rise to the phase of the run that caused it.

`rss_bytes` reads /proc/self/status (VmRSS now, or the peak VmHWM);
`reset_peak` starts the peak from now; `PeakPhases` reads VmHWM at the entry
and exit of each wrapped function and charges a rise since the last read to
the innermost phase then running.
Neighbours: serve.py (continuous batching), generate_memory.py (generate()).
"""
from __future__ import annotations

import functools


def rss_bytes(field: str = "VmRSS") -> int:
    """The process's resident memory now (VmRSS) or its peak (VmHWM)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def reset_peak() -> None:
    """Start the peak (VmHWM) from now: loading the weights peaks higher than
    serving (the state dict and the model both held), which would hide the
    serving peak. The heap's free pages go back to the OS first (glibc's
    malloc_trim): left resident, the loader's freed tensors would let a
    cell's first allocations (the KV store) fill them without raising RSS,
    by how much depending on the load, not on the method."""
    import ctypes
    import gc
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class PeakPhases:
    """Which phase raised the process's peak RSS (VmHWM), and by how much.
    `outside`: the phase charged while no wrapped function runs."""

    def __init__(self, outside: str):
        self.gain: dict[str, int] = {}
        self.stack = [outside]
        self.last = rss_bytes("VmHWM")

    def start(self) -> None:
        """Count rises from now (after `reset_peak`), forgetting those before."""
        self.gain.clear()
        self.last = rss_bytes("VmHWM")

    def note(self) -> None:
        peak = rss_bytes("VmHWM")
        if peak > self.last:
            label = self.stack[-1]
            self.gain[label] = self.gain.get(label, 0) + peak - self.last
            self.last = peak

    def run(self, label: str, f, *args, **kwargs):
        """f(*args, **kwargs) as the phase `label`."""
        self.note()
        self.stack.append(label)
        try:
            return f(*args, **kwargs)
        finally:
            self.note()
            self.stack.pop()

    def wrap(self, owner, name: str, label: str) -> None:
        """Every call of owner.name from now on runs as the phase `label`."""
        f = getattr(owner, name)
        setattr(owner, name, functools.wraps(f)(lambda *a, **k: self.run(label, f, *a, **k)))

    def mib(self) -> dict[str, float]:
        """MiB charged to each phase, largest first."""
        self.note()
        return {k: round(v / 2**20, 1) for k, v in sorted(self.gain.items(), key=lambda kv: -kv[1])}
