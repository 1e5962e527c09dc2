"""The sparse part S of GEAR: the s/2 largest and s/2 smallest entries of each
vector, taken out before quantizing so they do not stretch its range.

Vectors run along `dim`: tokens for K (one vector per channel of a block),
channels for V (one vector per token). `segment` quantizes each outlier's
place as its value clamped into the range of the rest of its quantization
group, and stores the outlier as an int8 count of units past what the codes
rebuild there (`steps`), a unit being the group's step (1/16 of it at 2
bits: `unit_shift`): one byte instead of fp16. A group's step is floored at
its largest such distance / MAX_STEPS units, so no count overflows.

V's outliers are per token: 2k channel indices of the narrowest integer
type and their int8 values ([N, 2k], a fixed-size row per token). K's are
per channel within a block, so a tile of tokens holds a varying number of
them; they are stored as position records in tile-CSR form (`records`): the
block's 2k * D records sorted by position (token, then channel), each an
int8 value and a packed (token mod 256, channel) position, with one pointer
per TILE-token record tile. A kernel reads the records of any aligned run of
record tiles as one contiguous slice, found by two pointer loads: no search,
no walk, no branch on the data. Neighbours: `segment` (calls `select` and
`steps` when compressing, `records` to store K's, `scatter` and
`scatter_records` to rebuild), the decode kernels (read the same tables and
add the units to the codes).
"""
from __future__ import annotations

import torch

from .packing import ceil_div


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


TILE = 16        # tokens a K-outlier pointer covers (`records`)
TOKEN_BITS = 8   # a record's token field: its token offset mod 256
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


def channel_bits(head_dim: int) -> int:
    """Bits of a K record's channel field: 8 up to 256 channels, so that a
    record is a 16-bit (token mod 256, channel) pair."""
    return max(8, (head_dim - 1).bit_length())


def record_dtype(head_dim: int) -> torch.dtype:
    """The K records' position dtype: 16 bits (stored as int16) up to 256
    channels, int32 above."""
    return torch.int16 if channel_bits(head_dim) + TOKEN_BITS <= 16 else torch.int32


def record_tiles(block: int) -> int:
    """TILE-token record tiles of a K block (the last may be short)."""
    return ceil_div(block, TILE)


def records(vals: torch.Tensor, idx: torch.Tensor, block: int) -> tuple[torch.Tensor, ...]:
    """A K table (vals int8 and token offsets idx [..., 2k, D], per channel)
    as tile-CSR records: (values int8 [..., 2k*D], positions [..., 2k*D],
    pointers int32 [..., record_tiles(block) + 1]).

    Records are sorted by (token, channel); a position packs (token mod 256)
    above the channel's `channel_bits`; pointer j is the first record of
    tokens >= TILE * j, so the records of record tiles [j0, j1) are
    [ptr[j0], ptr[j1]). A token's full offset is its record tile's 256-token
    base plus the stored low byte (kernel tiles never cross 256 tokens)."""
    D = idx.shape[-1]
    cb = channel_bits(D)
    channel = torch.arange(D, device=idx.device)
    key = (idx.long() * D + channel).flatten(-2)            # token-major position
    key, order = key.sort(dim=-1)
    vals = vals.flatten(-2).gather(-1, order)
    token, ch = key // D, key % D
    packed = ((token % 256) << cb) | ch
    if record_dtype(D) == torch.int16:                       # 16 bits held in an int16
        packed = torch.where(packed >= 1 << 15, packed - (1 << 16), packed)
    bounds = torch.arange(record_tiles(block) + 1, device=idx.device) * TILE
    ptr = torch.searchsorted(token.contiguous(), bounds.expand(*token.shape[:-1], -1).contiguous())
    return vals, packed.to(record_dtype(D)), ptr.to(torch.int32)


def record_positions(pos: torch.Tensor, ptr: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each record's (token offset within its block, channel), int64: the
    inverse of `records`' packing (the token's 256-token base is its record
    tile's, found from the pointers)."""
    cb = channel_bits(head_dim)
    raw = pos.long() & ((1 << (cb + TOKEN_BITS)) - 1)
    entry = torch.arange(pos.shape[-1], device=pos.device).expand(pos.shape).contiguous()
    tile = torch.searchsorted(ptr[..., 1:].contiguous().long(), entry, right=True)
    token = (tile * TILE) // 256 * 256 + (raw >> cb)
    return token, raw & ((1 << cb) - 1)


def scatter_records(vals: torch.Tensor, pos: torch.Tensor, ptr: torch.Tensor, block: int,
                    head_dim: int) -> torch.Tensor:
    """Dense units [..., block, head_dim] (fp32, zeros elsewhere) of a block's records."""
    token, ch = record_positions(pos, ptr, head_dim)
    out = torch.zeros(*vals.shape[:-1], block * head_dim, dtype=torch.float32, device=vals.device)
    out.scatter_(-1, token * head_dim + ch, vals.float())
    return out.unflatten(-1, (block, head_dim))


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
