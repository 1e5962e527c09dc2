"""What the gear backend did to each graph: sites, decisions, and the code diff.

`GraphReport` holds, for one compiled graph, every attention site (layer, form,
phase, rewritten or fallback and why) and the graph's Python code before and
after the rewrite; `diff()` is the readable unified diff (one layer's rewrite
in full, the layers with the same rewrite named), `diff(full=True)` every line.
Reports are collected by `record` into any active `collect()` context (used by
`explain`) and kept in `history` (the last 64) for users who compile directly.
Neighbours: `backend` (builds and records reports), `explain` (collects them),
`graph_diff` (shapes the diff), `passes.match` (names each site's layer).
"""
from __future__ import annotations

import contextlib
import itertools
import os
from dataclasses import dataclass, field

import torch.fx as fx

from . import graph_diff
from .config import GearConfig

_counter = itertools.count()
_collectors: list[list] = []
history: list = []


@dataclass
class SiteReport:
    layer: str
    form: str
    phase: str
    rewritten: bool
    reason: str
    cache_layer: str | None = None      # the cache layer read (`AttentionSite.cache_layer`), where known

    def line(self) -> str:
        status = "rewritten" if self.rewritten else "FALLBACK (exact)"
        return f"{self.layer:<32} {self.form:<6} {self.phase:<8} {status:<17} {self.reason}"


@dataclass
class GraphReport:
    index: int
    config: GearConfig
    sites: list[SiteReport] = field(default_factory=list)
    before: str = ""
    after: str = ""

    @classmethod
    def build(cls, before: fx.GraphModule, after: fx.GraphModule, sites, config: GearConfig,
              absorbed: frozenset = frozenset()):
        """`absorbed`: the indices of the rebuild sites whose attention this
        graph absorbed over the MLA latent (`passes.mla`), reported as form "mla"."""
        return cls(index=next(_counter), config=config,
                   sites=[SiteReport(s.layer, "mla" if s.index in absorbed and s.rewritable else s.form, s.phase,
                                     s.rewritable, s.reason, s.cache_layer) for s in sites],
                   before=before.code, after=after.code)

    @property
    def rewritten(self) -> int:
        return sum(s.rewritten for s in self.sites)

    @property
    def fallbacks(self) -> list[SiteReport]:
        return [s for s in self.sites if not s.rewritten]

    def summary(self) -> str:
        text = f"{len(self.sites)} attention site(s), {self.rewritten} rewritten with {self.config.describe()}"
        if self.fallbacks:
            text += f", {len(self.fallbacks)} left exact"
        return text

    def diff(self, full: bool = False) -> str:
        """The unified diff of the code before and after, signatures one
        parameter a line; abridged (graph_diff.readable_diff) unless `full`."""
        shape = graph_diff.full_diff if full else graph_diff.readable_diff
        return shape(self.before, self.after, f"graph_{self.index}_before.py", f"graph_{self.index}_after.py")

    def text(self) -> str:
        lines = [f"graph {self.index}: {self.summary()}"]
        lines += ["  " + s.line() for s in self.sites]
        return "\n".join(lines)

    def write(self, directory: str) -> str:
        return write_diff(os.path.join(directory, f"gear_graph_{self.index}.diff"), self.text(), self.diff())


def write_diff(path: str, text: str, diff: str) -> str:
    """A report file: `text` as # comments, then the unified diff; an abridged
    diff's note (how to get every line) moves to the file's first line."""
    note = graph_diff.NOTE + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(note if note in diff else "")
        f.write("# " + text.replace("\n", "\n# ") + "\n")
        f.write(diff.replace(note, ""))
    return path


def record(report: GraphReport) -> None:
    history.append(report)
    del history[:-64]
    for collector in _collectors:
        collector.append(report)


@contextlib.contextmanager
def collect():
    """Collect the reports of every graph compiled inside the block."""
    reports: list[GraphReport] = []
    _collectors.append(reports)
    try:
        yield reports
    finally:
        _collectors.remove(reports)
