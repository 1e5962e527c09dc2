"""Medians over interleaved rounds, for the benchmarks that run each method in
a fresh process, method after method, N rounds over (`generate_memory.py`,
`serve.py`).

A single run of a memory or serving measure moves by tens of percent on a
shared machine (glibc's mmap threshold, other jobs' load), so one run's
ratio cannot settle a target near it. Running the methods in turn, N times,
puts each round's methods under the same conditions; `summary` then gives
each method's median, its range, the ratio of its median to the baseline's,
and each round's own ratio (the one that drift cannot bias).
"""
from __future__ import annotations

import statistics


def summary(rows: list[dict], value: str, label: str, *, baseline: str = "dense",
            group: str | None = None, fmt: str = ".0f") -> str:
    """A markdown table of `rows[value]` per method (and per `group`, e.g. a
    budget): runs, median, range, x baseline (ratio of medians) and x baseline
    per round. Each row needs "method" and "round"; the per-round ratio pairs
    a method's run with the baseline's of the same round and group."""
    groups = list(dict.fromkeys(r.get(group) for r in rows)) if group else [None]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    head = (f"| {group + ' | ' if group else ''}method | runs | median {label} | range | "
            f"x {baseline} (medians) | x {baseline} per round |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for g in groups:
        mine = [r for r in rows if not group or r.get(group) == g]
        base = {r["round"]: r[value] for r in mine if r["method"] == baseline}
        key = (f"{g:g} | " if isinstance(g, float) else f"{g} | ") if group else ""
        for m in methods:
            runs = [r for r in mine if r["method"] == m]
            if not runs:
                continue
            xs = [r[value] for r in runs]
            med = statistics.median(xs)
            ratio = f"{med / statistics.median(base.values()):.2f}" if base else "-"
            per_round = ", ".join(f"{r[value] / base[r['round']]:.2f}" for r in runs
                                  if r["round"] in base) or "-"
            lines.append(f"| {key}{m} | {len(xs)} | {med:{fmt}} | "
                         f"{min(xs):{fmt}}-{max(xs):{fmt}} | {ratio} | {per_round} |")
    return "\n".join(lines)
