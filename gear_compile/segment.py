"""A segment: tokens compressed in uniform blocks, GEAR's `D + L + S` per block.

A layer's cache holds two segments per K/V: the prefill block (one block of
P tokens, rank r_p) and the decode blocks (n_b tokens each, rank r_g, stored
in a preallocated capacity). Both have the same layout, described once by
`SegmentLayout.parts` (each part's token unit: per token, per token group or
per block; shapes, writing, growing and slicing derive from it):

  codes    uint8 [B, H, N, W]       bit-packed along channels (`packing`)
  scale, zero  fp16                 channel axis: [B, H, N/G, D] (G tokens a group)
                                    token axis:   [B, H, N, D/G] (G channels a group)
  lr_a     int8 [B, H, N, r]        low-rank factor A, token-major
  lr_b     int8 [B, H, N/block, D, r]  low-rank factor B, one per block
  lr_s     fp32 [B, H, N/block, r]  per block, the scale of each column pair:
                                    L = lr_a diag(lr_s) lr_b^T (`lowrank.to_int8`)
  out_val  int8, out_idx            outliers, values as int8 units of their
                                    group's step. V: [B, H, N, 2k] channel
                                    indices per token. K: per block, the
                                    block's 2k*D records [B, H, N/block, 2k*D]
                                    (packed token/channel positions, sorted)
  out_ptr  int32 [B, H, N/block, T+1]  K: each TILE-token record tile's first
                                    record (tile-CSR, `outliers.records`)
With bits=16 (method none) `codes` is the exact [B, H, N, D] tensor.
Reconstruction is X = dequant(codes + scatter(out)) + lr_a diag(lr_s) lr_b^T:
an outlier is the code at its place plus a signed number of units of the
group's step (`outliers`).
Neighbours: `quantize`, `packing`, `outliers`, `lowrank` (the parts),
`store` (owns two segments and the buffer), the attention kernels (read
this layout directly).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, fields

import torch

from . import lowrank, outliers, packing
from .codec import QuantSpec
from .quantize import FP16_MAX, dequantize, quantize as _quant

@dataclass(frozen=True)
class Part:
    """One stored tensor of a segment: [B, H, tokens // unit, *row] of `dtype`.

    `unit` is the part's granularity along the token axis: 1 for per-token
    parts, the token group for per-channel scales, the block for per-block
    parts. Shapes, writing a block, growing and slicing all derive from it.
    """

    name: str
    unit: int
    row: tuple
    dtype: torch.dtype

    def rows(self, tokens: int) -> int:
        """Rows holding the first `tokens` tokens (rounded up to whole units)."""
        return packing.ceil_div(tokens, self.unit)


@dataclass(frozen=True)
class SegmentLayout:
    """Static description of a segment: what is stored and how it is grouped."""

    spec: QuantSpec
    kind: str            # "k" or "v": decides the outlier axis
    block: int           # tokens per block (low-rank and outlier unit)
    rank: int
    outliers_per_side: int
    head_dim: int
    dtype: torch.dtype   # of exact values: the store's held dtype (`CodecConfig.held_dtype`)
    power_iters: int = 3

    @property
    def exact(self) -> bool:
        return self.spec.bits == 16

    @property
    def token_group(self) -> int:
        """Tokens sharing one (scale, zero) on the channel axis."""
        return self.spec.group or self.block

    @property
    def channel_group(self) -> int:
        return self.spec.group or self.head_dim

    @functools.cached_property
    def parts(self) -> tuple[Part, ...]:
        """The stored tensors, in their fixed order."""
        D, k2 = self.head_dim, 2 * self.outliers_per_side
        if self.exact:
            return (Part("codes", 1, (D,), self.dtype),)
        fp16 = torch.float16
        if self.spec.axis == "channel":
            stats_unit, stats_row = self.token_group, (D,)
        else:
            stats_unit, stats_row = 1, (D // self.channel_group,)
        parts = [Part("codes", 1, (packing.packed_width(D, self.spec.bits),), torch.uint8),
                 Part("scale", stats_unit, stats_row, fp16),
                 Part("zero", stats_unit, stats_row, fp16)]
        if self.rank:
            parts += [Part("lr_a", 1, (self.rank,), torch.int8),
                      Part("lr_b", self.block, (D, self.rank), torch.int8),
                      Part("lr_s", self.block, (self.rank,), torch.float32)]
        if k2 and self.kind == "k":  # per block: 2k records per channel, tile-CSR
            parts += [Part("out_val", self.block, (k2 * D,), torch.int8),
                      Part("out_idx", self.block, (k2 * D,), outliers.record_dtype(D)),
                      Part("out_ptr", self.block, (outliers.record_tiles(self.block) + 1,), torch.int32)]
        elif k2:                     # per token: 2k channel indices
            parts += [Part("out_val", 1, (k2,), torch.int8),
                      Part("out_idx", 1, (k2,), outliers.index_dtype(D))]
        return tuple(parts)

    @functools.cached_property
    def part_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.parts)

    def shapes(self, batch: int, heads: int, tokens) -> dict:
        """name -> (shape, dtype) of each stored part for `tokens` tokens
        (a multiple of `block`; may be a SymInt)."""
        return {p.name: ((batch, heads, tokens // p.unit, *p.row), p.dtype) for p in self.parts}

    def validate(self, x: torch.Tensor) -> None:
        D = x.shape[-1]
        if D != self.head_dim:
            raise ValueError(f"segment: head_dim must be {self.head_dim}, got {D}.")
        if not self.exact and (why := self.spec.unfit(D)):
            raise ValueError(f"segment: {why} (per-token groups); choose a divisor of {D}.")
        if not self.exact and self.spec.axis == "channel" and self.block % self.token_group:
            raise ValueError(f"segment: block {self.block} must be a multiple of the token "
                             f"group {self.token_group}.")


@dataclass
class Segment:
    """The stored parts of one segment (None where the layout stores nothing)."""

    codes: torch.Tensor
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    lr_a: torch.Tensor | None = None
    lr_b: torch.Tensor | None = None
    lr_s: torch.Tensor | None = None
    out_val: torch.Tensor | None = None
    out_idx: torch.Tensor | None = None
    out_ptr: torch.Tensor | None = None

    def parts(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts().values())

    @classmethod
    def empty(cls, layout: SegmentLayout, batch: int, heads: int, tokens: int, device) -> Segment:
        return cls(**{name: torch.zeros(shape, dtype=dtype, device=device)
                      for name, (shape, dtype) in layout.shapes(batch, heads, tokens).items()})

    def write(self, src: Segment, layout: SegmentLayout, at_token: int) -> None:
        """Copy `src` (whole blocks) into this segment starting at token `at_token`."""
        for part in layout.parts:
            t = getattr(src, part.name)
            row = at_token // part.unit
            getattr(self, part.name)[:, :, row:row + t.shape[2]].copy_(t)

    def blocks(self, layout: SegmentLayout, first: int, count: int) -> Segment:
        """Views of blocks [first, first + count) as a segment of their own."""
        rows = {p.name: (first * layout.block // p.unit, count * layout.block // p.unit)
                for p in layout.parts}
        return Segment(**{name: getattr(self, name)[:, :, r0:r0 + n] for name, (r0, n) in rows.items()})

    def resized(self, layout: SegmentLayout, tokens: int) -> Segment:
        """A segment of capacity `tokens` holding this one's content (growth)."""
        B, H = self.codes.shape[:2]
        out = Segment.empty(layout, B, H, tokens, self.codes.device)
        for part in layout.parts:
            src = getattr(self, part.name)
            getattr(out, part.name)[:, :, :src.shape[2]].copy_(src)
        return out


def compress(x: torch.Tensor, layout: SegmentLayout, check_finite: bool = False) -> Segment:
    """Compress x [B, H, N, D] (N a multiple of layout.block) block by block."""
    layout.validate(x)
    B, H, N, D = x.shape
    if layout.exact:
        return Segment(codes=x.to(layout.dtype).clone())
    if check_finite:
        _check_finite(x)
    nblk = N // layout.block
    xf = x.float()
    rest, floor = xf, None
    if layout.outliers_per_side and N:
        view, dim = _vectors(xf, layout, nblk)
        _, idx = outliers.select(view, layout.outliers_per_side, dim)
        taken = torch.zeros_like(view, dtype=torch.bool).scatter(dim, idx.long(), True)
        rest = _clamped_into_groups(xf, taken.reshape(B, H, N, D), layout)
        unit = outliers.unit(layout.spec.bits)
        floor = (xf - rest).abs() / (outliers.MAX_STEPS * unit)
    codes, scale, zero, deq = _quantize_grouped(rest, layout, floor)
    seg = Segment(codes=packing.pack(codes, layout.spec.bits), scale=scale, zero=zero)
    approx = deq
    if floor is not None:                           # each outlier: units past its place's code
        at = idx.long()
        gap = _vectors(xf - deq, layout, nblk)[0].gather(dim, at)
        unit_at = _vectors(_steps_per_entry(scale, layout, N), layout, nblk)[0].gather(dim, at) * unit
        seg.out_val = outliers.steps(gap / torch.where(unit_at == 0, 1.0, unit_at))
        approx = deq + outliers.scatter(seg.out_val * unit_at, idx, view, dim).reshape(B, H, N, D)
        seg.out_idx = idx
        if layout.kind == "k":
            seg.out_val, seg.out_idx, seg.out_ptr = outliers.records(seg.out_val, idx, layout.block)
    if layout.rank:
        # non-finite entries (only without check_finite) stay confined to their own
        # vector: they must not reach the power iteration, which would spread
        # NaN over every token and channel of the block
        residual = torch.nan_to_num(xf - approx, nan=0.0, posinf=0.0, neginf=0.0)
        residual = residual.reshape(B, H, nblk, layout.block, D)
        a, seg.lr_b, seg.lr_s = lowrank.to_int8(*lowrank.power_iteration(residual, layout.rank,
                                                                       layout.power_iters))
        seg.lr_a = a.reshape(B, H, N, layout.rank)
    return seg


def _clamped_into_groups(x: torch.Tensor, taken: torch.Tensor, layout: SegmentLayout) -> torch.Tensor:
    """x with each taken entry (an outlier) clamped into the range of the
    entries of its quantization group that are not taken, so that it
    stretches no range (a group taken whole keeps its values)."""
    shape, dim = _groups(layout, x.shape)
    xg, tg = x.reshape(shape), taken.reshape(shape)
    lo = torch.where(tg, torch.inf, xg).amin(dim, keepdim=True)
    hi = torch.where(tg, -torch.inf, xg).amax(dim, keepdim=True)
    inside = torch.minimum(torch.maximum(xg, lo), hi)
    return torch.where(tg & (lo <= hi), inside, xg).reshape(x.shape)


def _groups(layout: SegmentLayout, shape) -> tuple[tuple, int]:
    """[B, H, N, D] as quantization groups: (the grouped shape, the axis its
    statistics run over)."""
    B, H, N, D = shape
    if layout.spec.axis == "channel":
        G = layout.token_group
        return (B, H, N // G, G, D), -2
    G = layout.channel_group
    return (B, H, N, D // G, G), -1


def _vectors(x: torch.Tensor, layout: SegmentLayout, nblk: int):
    """x [B, H, N, D] as outlier vectors and their axis: K per channel over
    each block's tokens ([B, H, nblk, block, D], -2), V per token (x, -1)."""
    if layout.kind == "k":
        return x.reshape(x.shape[0], x.shape[1], nblk, layout.block, x.shape[-1]), -2
    return x, -1


def _steps_per_entry(scale: torch.Tensor, layout: SegmentLayout, tokens: int) -> torch.Tensor:
    """Each entry's quantization step, fp32 [B, H, tokens, D]."""
    if layout.spec.axis == "channel":
        return scale[:, :, :tokens // layout.token_group].float().repeat_interleave(layout.token_group, 2)
    return scale[:, :, :tokens].float().repeat_interleave(layout.channel_group, 3)


def decompress(seg: Segment, layout: SegmentLayout, tokens: int | None,
               dtype: torch.dtype) -> torch.Tensor:
    """Rebuild the first `tokens` tokens (None: all) as [B, H, tokens, D] of `dtype`."""
    n_all = seg.codes.shape[2]
    n = n_all if tokens is None else tokens
    if layout.exact:
        return seg.codes[:, :, :n].to(dtype)
    B, H = seg.codes.shape[:2]
    D, blk = layout.head_dim, layout.block
    nblk = packing.ceil_div(n, blk) if blk else 0
    m = nblk * blk                                  # whole blocks covering n
    codes = packing.unpack(seg.codes[:, :, :m], layout.spec.bits, D).float()
    if seg.out_val is not None:                     # outliers: units past the codes
        if layout.kind == "k":
            units = outliers.scatter_records(seg.out_val[:, :, :nblk], seg.out_idx[:, :, :nblk],
                                             seg.out_ptr[:, :, :nblk], blk, D).reshape(B, H, m, D)
        else:
            units = outliers.scatter(seg.out_val[:, :, :m], seg.out_idx[:, :, :m], codes, -1)
        codes = codes + units * outliers.unit(layout.spec.bits)
    if layout.spec.axis == "channel":
        G = layout.token_group
        x = dequantize(codes.reshape(B, H, m // G, G, D), seg.scale[:, :, :m // G, None],
                        seg.zero[:, :, :m // G, None]).reshape(B, H, m, D)
    else:
        G = layout.channel_group
        x = dequantize(codes.reshape(B, H, m, D // G, G), seg.scale[:, :, :m, :, None],
                        seg.zero[:, :, :m, :, None]).reshape(B, H, m, D)
    if seg.lr_a is not None:
        a = seg.lr_a[:, :, :m].reshape(B, H, nblk, blk, layout.rank)
        x = x + lowrank.product(a, seg.lr_b[:, :, :nblk], seg.lr_s[:, :, :nblk]).reshape(B, H, m, D)
    return x[:, :, :n].to(dtype)


def _quantize_grouped(x: torch.Tensor, layout: SegmentLayout, floor: torch.Tensor | None = None):
    """Quantize x [B, H, N, D] with the layout's grouping; floor (like x, or
    None): each group's scale is at least its largest floor entry.
    Returns (codes [B,H,N,D], scale, zero, dequantized fp32 [B,H,N,D])."""
    B, H, N, D = x.shape
    bits = layout.spec.bits
    shape, dim = _groups(layout, x.shape)
    xg = x.reshape(shape)
    min_scale = None if floor is None else floor.reshape(shape).amax(dim, keepdim=True)
    codes, scale, zero = _quant(xg, bits, dim=dim, min_scale=min_scale)
    deq = dequantize(codes, scale, zero).reshape(B, H, N, D)
    return codes.reshape(B, H, N, D), scale.squeeze(dim), zero.squeeze(dim), deq


def _check_finite(x: torch.Tensor) -> None:
    bad = ~torch.isfinite(x)
    if bad.any():
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"gear compress: input holds {int(bad.sum())} non-finite value(s), "
                         f"first at index {where}; NaN/inf cannot be quantized.")
    big = x.float().abs().max().item() if x.numel() else 0.0
    if big > FP16_MAX:
        raise ValueError(f"gear compress: |x| reaches {big:g}, beyond the fp16 range "
                         f"({FP16_MAX:g}) of the stored scales and zero points.")
