"""The sparse part S of GEAR: the s/2 largest and s/2 smallest entries of each
vector, taken out before quantizing so they do not stretch its range.

Vectors run along `dim`: tokens for K (one vector per channel of a block),
channels for V (one vector per token). `segment` quantizes each outlier's
place as its value clamped into the range of the rest of its quantization
group, and stores the outlier as an int8 count of units past what the codes
rebuild there (`steps`), a unit being the group's step (1/16 of it at 2
bits: `unit_shift`): one byte instead of fp16. A group's step is floored at
its largest such distance / MAX_STEPS units, so no count overflows.

Indices take the narrowest integer type; a K block longer than `SPAN` tokens
(a long prompt's prefill block) stores each entry's offset within its
SPAN-token span as one byte, plus per channel the count of entries up to the
end of each span (`spans`, `join_spans`): the same table, losslessly, in
half the index bytes of int16 offsets. Neighbours: `segment` (calls `select`
and `steps` when compressing, `scatter` to rebuild), the decode kernels (read
the same unit/index/span tables and add the units to the codes).
"""
from __future__ import annotations

import torch


def count_per_side(ratio: float, length: int) -> int:
    """Outliers kept at each end of a vector of `length` entries (round half up),
    never more than half the vector."""
    if ratio <= 0 or length <= 1:
        return 0
    return min(int(ratio / 2 * length + 0.5), length // 2)


def index_dtype(length: int) -> torch.dtype:
    """Narrowest integer type that indexes a vector of `length` entries."""
    if length <= 256:
        return torch.uint8
    if length <= 32768:
        return torch.int16
    return torch.int32


SPAN = 256      # tokens a one-byte offset spans
MAX_STEPS = 126  # an outlier is at most this many units from its place's value


def unit_shift(bits: int) -> int:
    """Outlier counts are in units of 2^-shift of their group's step: 1/16 at
    2 bits, whole steps above. Measured on SmolLM2 (held-out text, P = 64 /
    512): whole steps cost GEAR(KIVI-2) +12.9 / +12.7 % perplexity against
    +8.8 / +8.7 % with fp16 values (1/4: +11.3 / +10.0; 1/8: +10.6 / +9.9;
    1/16: +9.1 / +9.7); at 4 bits whole steps stay within noise of fp16."""
    return 4 if bits <= 2 else 0


def unit(bits: int) -> float:
    """An outlier count's unit, in steps of its group (`unit_shift`)."""
    return 2.0 ** -unit_shift(bits)


def steps(excess: torch.Tensor) -> torch.Tensor:
    """Outliers' distances from what the codes rebuild there, in units, as
    int8 (non-finite: 0)."""
    return torch.nan_to_num(excess.round(), nan=0.0, posinf=0.0, neginf=0.0).clamp(-127, 127).to(torch.int8)


def spans(idx: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token offsets idx [..., 2k, D] (ascending along 2k) of a `length`-token
    block as (offsets within their SPAN-token span, uint8; per channel the
    number of entries before the end of each span [..., ceil(length / SPAN), D])."""
    bounds = torch.arange(1, -(-length // SPAN) + 1, device=idx.device) * SPAN
    ends = (idx.long().unsqueeze(-2) < bounds[:, None]).sum(-3)
    return (idx % SPAN).to(torch.uint8), ends.to(index_dtype(idx.shape[-2] + 1))


def join_spans(low: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """The block offsets (int64) that `spans` split: entry e of a channel lies
    in the span whose end count first exceeds e."""
    entry = torch.arange(low.shape[-2], device=low.device)[:, None, None]
    span = (ends.long().unsqueeze(-3) <= entry).sum(-2)
    return low.long() + span * SPAN


def select(x: torch.Tensor, k: int, dim: int):
    """Top-k and bottom-k of x along dim.

    Returns (values fp32, indices narrow int), of size 2k along `dim`,
    indices ascending: a K block's table then lists each channel's outliers
    in token order, so the decode kernels find a tile's entries as one run
    per channel.
    """
    length = x.shape[dim]
    hi_v, hi_i = x.topk(k, dim=dim)
    # the bottom k among the rest: with ties (a constant vector) the two
    # top-k calls could pick the same entry, which a reader that adds the
    # table's entries (the decode kernel) would count twice
    lo_v, lo_i = x.scatter(dim, hi_i, float("inf")).topk(k, dim=dim, largest=False)
    idx, order = torch.cat([hi_i, lo_i], dim=dim).sort(dim=dim)
    vals = torch.cat([hi_v, lo_v], dim=dim).gather(dim, order)
    return vals, idx.to(index_dtype(length))


def scatter(values: torch.Tensor, indices: torch.Tensor, like: torch.Tensor, dim: int) -> torch.Tensor:
    """Dense S (zeros elsewhere) shaped like `like`, fp32."""
    out = torch.zeros(like.shape, dtype=torch.float32, device=like.device)
    return out.scatter(dim, indices.long(), values.float())
