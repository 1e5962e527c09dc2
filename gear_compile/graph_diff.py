"""The graph diff a person reads: a graph's code before and after the rewrite
as a unified diff, signatures one parameter a line, and when several layers get
the same rewrite, one layer in full and the others named.

`full_diff` has every line (difflib's unified diff of the wrapped code).
`readable_diff` replaces the hunks of a layer whose rewrite (its changed lines,
up to layer indices and Dynamo's numbering of names: `keys_3`, `s94`,
`layers_modules_3_`) equals an earlier layer's with one line after that
layer's last hunk, e.g. `# layers 1-29: the same rewrite as layer 0`
(compared in any order, without FX's `x = None` after a last use); a block
of lines that the next blocks repeat up to numbering (a prefill graph's
per-layer outputs) is shown once and the repeats counted; and it starts with
`NOTE` when it left anything out. A hunk belongs to the one layer its changed
lines name (`layers_modules_3_`, `cache_layers_3_`, `layers.3.`), else to the
layer whose code encloses it; a hunk naming several layers, or none, is
always shown.
Neighbours: `report` (GraphReport.diff and write_diff call it), `explain`.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

NOTE = ("# abridged: a layer whose rewrite matches an earlier layer's is named, and lines repeating "
        "the block above them are counted, not shown; GraphReport.diff(full=True) or "
        "Explanation.diff(full=True) has every line")

_SIGNATURE = re.compile(r"^(\s*)def (\w+)\((.*)\)(\s*->\s*[^:]+)?:\s*$")
_LAYER = re.compile(r"(?<![A-Za-z0-9])(?:layers|modules)[._](\d+)(?![0-9])")
_SUFFIX = re.compile(r"\b([A-Za-z_]\w*?)_\d+\b")                 # keys_3 -> keys
_NUMBER_IN_NAME = re.compile(r"(?<=[A-Za-z_])\d+|(?<=\.)\d+(?=\.)")  # layers_3_, s94, .3.
_FREED = re.compile(r";  (?:\w+ = )+None$")                      # FX freeing values after a last use
_MAX_PERIOD = 200                                                # longest repeated block looked for
_COMPUTES = re.compile(r"^\s+\w+ = (?!\w+\s*$)")                 # an assignment, not a rename


def wrap_signatures(code: str) -> str:
    """Each `def f(a, b):` line as `def f(`, one parameter a line, then `):`."""
    return "\n".join(_wrap(line) for line in code.splitlines())


def _wrap(line: str) -> str:
    match = _SIGNATURE.match(line)
    if not match or not match.group(3).strip():
        return line
    indent, name, params, returns = match.groups()
    body = "".join(f"\n{indent}    {p}," for p in _parameters(params))
    return f"{indent}def {name}({body}\n{indent}){returns or ''}:"


def _parameters(params: str) -> list[str]:
    """`params` split at its top-level commas."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(params):
        depth += (ch in "([{") - (ch in ")]}")
        if ch == "," and depth == 0:
            parts.append(params[start:i])
            start = i + 1
    parts.append(params[start:])
    return [p.strip() for p in parts if p.strip()]


@dataclass
class _Hunk:
    lines: list[str]            # the @@ header, then " ", "-" and "+" lines
    changes: list[str]          # its "-" and "+" lines
    layer: int | None


def full_diff(before: str, after: str, fromfile: str, tofile: str) -> str:
    """The unified diff of the two codes, signatures wrapped; every line."""
    hunks = _hunks(wrap_signatures(before).splitlines(), wrap_signatures(after).splitlines())
    return _join([f"--- {fromfile}", f"+++ {tofile}"], [line for h in hunks for line in h.lines])


def readable_diff(before: str, after: str, fromfile: str, tofile: str) -> str:
    """`full_diff` with a layer whose rewrite matches an earlier layer's named
    after that layer's hunks instead of shown, and a block of lines repeating
    the block above it counted instead of shown; starts with NOTE if abridged."""
    hunks = _hunks(wrap_signatures(before).splitlines(), wrap_signatures(after).splitlines())
    same_as = _same_rewrites(hunks)
    last_hunk = {h.layer: i for i, h in enumerate(hunks)}
    body = []
    for i, hunk in enumerate(hunks):
        if hunk.layer in same_as:
            continue
        body += hunk.lines[:1] + _collapse_repeats(hunk.lines[1:])
        followers = [layer for layer, first in same_as.items() if first == hunk.layer]
        if followers and last_hunk[hunk.layer] == i:
            body.append(f"# {_layer_list(followers)}: the same rewrite as layer {hunk.layer}")
    # each summary line stands for at least two lines left out
    abridged = len(body) < sum(len(h.lines) for h in hunks)
    return _join([NOTE] * abridged + [f"--- {fromfile}", f"+++ {tofile}"], body)


def _join(header: list[str], body: list[str]) -> str:
    return "\n".join(header + body) + "\n" if body else ""


def _hunks(before: list[str], after: list[str], context: int = 3) -> list[_Hunk]:
    """difflib.unified_diff's hunks, each with the layer it belongs to."""
    hunks = []
    for group in difflib.SequenceMatcher(None, before, after).get_grouped_opcodes(context):
        lines = [f"@@ -{_range(group[0][1], group[-1][2])} +{_range(group[0][3], group[-1][4])} @@"]
        for tag, a1, a2, b1, b2 in group:
            if tag == "equal":
                lines += [" " + line for line in before[a1:a2]]
            else:
                lines += ["-" + line for line in before[a1:a2]] + ["+" + line for line in after[b1:b2]]
        changes = [line for line in lines[1:] if line[0] in "+-"]
        edits = [op for op in group if op[0] != "equal"]
        hunks.append(_Hunk(lines, changes, _layer(changes, before, edits[0][1], edits[-1][2])))
    return hunks


def _range(start: int, stop: int) -> str:
    """A hunk header's range, as difflib writes it."""
    length = stop - start
    first = start + 1 if length else start
    return str(first) if length == 1 else f"{first},{length}"


def _layer(changes: list[str], before: list[str], start: int, stop: int) -> int | None:
    """The one layer the changed lines name, else the layer whose computing
    lines come both right before and right after before[start:stop]."""
    named = {_first_layer(line) for line in changes} - {None}
    if named:
        return named.pop() if len(named) == 1 else None
    above = _nearest_layer(reversed(before[:start]))
    return above if above is not None and above == _nearest_layer(before[stop:]) else None


def _first_layer(line: str) -> int | None:
    match = _LAYER.search(line)
    return int(match.group(1)) if match else None


def _nearest_layer(lines) -> int | None:
    for line in lines:
        if _COMPUTES.match(line) and _LAYER.search(line):
            return _first_layer(line)
    return None


def _same_rewrites(hunks: list[_Hunk]) -> dict[int, int]:
    """{layer: the first layer with the same normalised changed lines, in any
    order (difflib may order a layer's - and + lines differently)}, for each
    layer that is not itself the first."""
    rewrites: dict[int, list[str]] = {}
    for hunk in hunks:
        if hunk.layer is not None:
            rewrites.setdefault(hunk.layer, []).extend(_normalise(line) for line in hunk.changes)
    first: dict[tuple, int] = {}
    same_as = {}
    for layer in sorted(rewrites):
        earlier = first.setdefault(tuple(sorted(rewrites[layer])), layer)
        if earlier != layer:
            same_as[layer] = earlier
    return same_as


def _collapse_repeats(lines: list[str]) -> list[str]:
    """`lines` with each block that the next blocks repeat (up to numbering)
    kept once and the repeats replaced by one line counting them."""
    norm = [_normalise(line) for line in lines]
    out, i = [], 0
    while i < len(lines):
        period, count = _repeat_at(norm, i)
        out += lines[i:i + period]
        if count > 1:
            out.append(f"# ... {count - 1} more like the {period} line(s) above, up to numbering")
        i += period * count
    return out


def _repeat_at(norm: list[str], i: int) -> tuple[int, int]:
    """(period, count): norm[i:] starts with `count` copies of a block of
    `period` lines, the pair leaving out the most lines, at least two;
    (1, 1) if none does."""
    best, left_out = (1, 1), 1
    for period in range(1, min(_MAX_PERIOD, (len(norm) - i) // 2) + 1):
        if norm[i + period] != norm[i]:
            continue
        count = 1
        while norm[i + count * period:i + (count + 1) * period] == norm[i:i + period]:
            count += 1
        if period * (count - 1) > left_out:
            best, left_out = (period, count), period * (count - 1)
    return best


def _normalise(line: str) -> str:
    """`line` up to numbering, without FX's `;  x = y = None` after a last use."""
    return _NUMBER_IN_NAME.sub("#", _SUFFIX.sub(r"\1", _FREED.sub("", line)))


def _layer_list(layers: list[int]) -> str:
    """[1, 2, 3, 5] -> "layers 1-3, 5"; [4] -> "layer 4"."""
    runs: list[list[int]] = []
    for layer in sorted(layers):
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    text = ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)
    return ("layers " if len(layers) > 1 else "layer ") + text
