"""Triton quantize + pack: the backbone step of compressing a block at a flush point.

Job: for x [B, H, N, D] (the residual left once outliers are removed), produce
exactly what `segment._quantize_grouped` + `packing.pack` produce: packed codes
uint8 [B, H, N, W], and fp16 scale / zero point grouped on the channel axis
([B, H, N/G, D], statistics over G tokens) or the token axis ([B, H, N, D/G],
over G channels), bit for bit (the fp16 zero rounded down and scale rounded
up as in `quantize`, round-half-to-even codes, NaN scale for non-finite groups).
Outlier selection and the low-rank power iteration stay in torch.
Neighbours: `quantize` / `packing` (the reference semantics), `segment`
(the layout), `decode_attention` (reads what this writes).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..packing import packed_width


@triton.jit
def _fp16_step(h, up: tl.constexpr):
    """The fp16 neighbour of finite h toward +inf (up) or -inf, by its bits."""
    bits = h.to(tl.int16, bitcast=True).to(tl.int32)
    if up:      # h >= 0 here: the next magnitude up
        nxt = bits + 1
    else:       # positive: one magnitude down; zero: -min subnormal; negative: up
        nxt = tl.where(h > 0, bits - 1, tl.where(h == 0, -32767, bits + 1))
    return nxt.to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _nan_or_pad(lo, hi, nan, ok):
    """NaN statistics for groups holding a NaN (torch's amin/amax propagate it;
    Triton's min/max skip it), zeros on padding lanes."""
    lo = tl.where(nan != 0, float("nan"), tl.where(ok, lo, 0.0))
    hi = tl.where(nan != 0, float("nan"), tl.where(ok, hi, 0.0))
    return lo, hi


@triton.jit
def _quantize(x, lo, hi, BITS: tl.constexpr):
    """codes (int32), scale and zero (fp16) of x given its group's min and max."""
    levels: tl.constexpr = (1 << BITS) - 1
    zero = lo.to(tl.float16)
    zero = tl.where(zero.to(tl.float32) > lo, _fp16_step(zero, False), zero)
    exact = (hi - zero.to(tl.float32)) / levels
    scale = exact.to(tl.float16)
    scale = tl.where(scale.to(tl.float32) < exact, _fp16_step(scale, True), scale)
    safe = tl.where(scale == 0, 1.0, scale.to(tl.float32))
    v = (x - zero.to(tl.float32)) / safe
    r = tl.floor(v + 0.5)
    r = tl.where((r == v + 0.5) & (r - 2.0 * tl.floor(r * 0.5) == 1.0), r - 1.0, r)  # ties to even
    r = tl.minimum(tl.maximum(r, 0.0), levels)
    r = tl.where(r == r, r, 0.0)                                                     # NaN -> 0
    bad = (lo != lo) | (hi != hi) | (tl.abs(lo) == float("inf")) | (tl.abs(hi) == float("inf"))
    scale = tl.where(bad, float("nan"), scale.to(tl.float32)).to(tl.float16)
    return r.to(tl.int32), scale, zero


@triton.jit
def _pack_store(codes, out, t, ok_t, W: tl.constexpr, WP: tl.constexpr, PB: tl.constexpr,
                TT: tl.constexpr, BITS: tl.constexpr):
    """Planar packing: field i of byte j holds the code of channel i*W + j."""
    fields = tl.reshape(codes, (TT, PB, WP))
    shift = tl.arange(0, PB) * BITS
    byte = tl.sum(fields << shift[None, :, None], axis=1)     # fields do not overlap: sum = or
    j = tl.arange(0, WP)
    tl.store(out + t[:, None] * W + j[None, :], byte.to(tl.uint8),
             mask=ok_t[:, None] & (j < W)[None, :])


@triton.jit
def _quant_pack_kernel(X, Codes, Scale, Zero, N, group,
                       D: tl.constexpr, W: tl.constexpr, WP: tl.constexpr, PB: tl.constexpr,
                       E: tl.constexpr, TT: tl.constexpr, BITS: tl.constexpr,
                       AXIS_CHANNEL: tl.constexpr):
    head = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, E)
    ch = (e // WP) * W + e % WP          # the extended channel axis of `decode_attention`
    ok_c = (e % WP < W) & (ch < D)
    X += head * N * D
    Codes += head * N * W
    if AXIS_CHANNEL:
        # one program per token group: min/max over its tokens, then codes
        Scale += head * (N // group) * D
        Zero += head * (N // group) * D
        t0 = tl.program_id(1) * group
        lo = tl.full([E], float("inf"), tl.float32)
        hi = tl.full([E], float("-inf"), tl.float32)
        nan = tl.zeros([E], tl.int32)
        for c0 in range(0, group, TT):
            t = t0 + c0 + tl.arange(0, TT)
            ok = ((c0 + tl.arange(0, TT)) < group)[:, None] & ok_c[None, :]
            x = tl.load(X + t[:, None] * D + ch[None, :], mask=ok, other=0.0).to(tl.float32)
            lo = tl.minimum(lo, tl.min(tl.where(ok, x, float("inf")), axis=0))
            hi = tl.maximum(hi, tl.max(tl.where(ok, x, float("-inf")), axis=0))
            nan = tl.maximum(nan, tl.max((x != x).to(tl.int32), axis=0))
        lo, hi = _nan_or_pad(lo, hi, nan, ok_c)
        for c0 in range(0, group, TT):
            ok_t = (c0 + tl.arange(0, TT)) < group
            t = t0 + c0 + tl.arange(0, TT)
            ok = ok_t[:, None] & ok_c[None, :]
            x = tl.load(X + t[:, None] * D + ch[None, :], mask=ok, other=0.0).to(tl.float32)
            codes, scale, zero = _quantize(x, lo[None, :], hi[None, :], BITS)
            _pack_store(tl.where(ok, codes, 0), Codes, t, ok_t, W, WP, PB, TT, BITS)
        _, scale, zero = _quantize(lo, lo, hi, BITS)
        at = tl.program_id(1) * D + ch
        tl.store(Scale + at, scale, mask=ok_c)
        tl.store(Zero + at, zero, mask=ok_c)
    else:
        # one program per TT tokens: min/max per (token, channel group)
        Scale += head * N * (D // group)
        Zero += head * N * (D // group)
        t = tl.program_id(1) * TT + tl.arange(0, TT)
        ok_t = t < N
        ok = ok_t[:, None] & ok_c[None, :]
        x = tl.load(X + t[:, None] * D + ch[None, :], mask=ok, other=0.0).to(tl.float32)
        gid = ch // group
        lo = tl.zeros([TT, E], tl.float32)
        hi = tl.zeros([TT, E], tl.float32)
        nan = tl.zeros([TT, E], tl.int32)
        for gi in range(0, D // group):
            inside = (gid == gi)[None, :] & ok
            g_lo = tl.min(tl.where(inside, x, float("inf")), axis=1)
            g_hi = tl.max(tl.where(inside, x, float("-inf")), axis=1)
            g_nan = tl.max((inside & (x != x)).to(tl.int32), axis=1)
            lo = tl.where((gid == gi)[None, :], g_lo[:, None], lo)
            hi = tl.where((gid == gi)[None, :], g_hi[:, None], hi)
            nan = tl.where((gid == gi)[None, :], g_nan[:, None], nan)
        lo, hi = _nan_or_pad(lo, hi, nan, ok)
        codes, scale, zero = _quantize(x, lo, hi, BITS)
        _pack_store(tl.where(ok, codes, 0), Codes, t, ok_t, W, WP, PB, TT, BITS)
        # every channel of a group writes the same (scale, zero)
        at = t[:, None] * (D // group) + gid[None, :]
        tl.store(Scale + at, scale, mask=ok)
        tl.store(Zero + at, zero, mask=ok)


def quantize_pack(x: torch.Tensor, bits: int, axis: str, group: int):
    """x [B, H, N, D] -> (codes uint8 [B, H, N, W], scale fp16, zero fp16), as
    `segment._quantize_grouped` then `packing.pack` with a QuantSpec of this
    `bits` and `axis` and the layout's resolved group (tokens on the channel
    axis, channels on the token axis)."""
    B, H, N, D = x.shape
    if axis == "channel" and N % group or axis == "token" and D % group:
        raise ValueError(f"quantize_pack: group {group} must divide the {axis} extent.")
    x = x.contiguous()
    PB = 8 // bits
    W = packed_width(D, bits)
    WP = max(1 << (W - 1).bit_length(), 16 // PB)
    codes = torch.empty(B, H, N, W, dtype=torch.uint8, device=x.device)
    if axis == "channel":
        sz, grid = (B, H, N // group, D), (B * H, N // group)
    else:
        sz, grid = (B, H, N, D // group), (B * H, -(-N // 16))
    scale = torch.empty(sz, dtype=torch.float16, device=x.device)
    zero = torch.empty(sz, dtype=torch.float16, device=x.device)
    if N:
        _quant_pack_kernel[grid](x, codes, scale, zero, N, group, D=D, W=W, WP=WP, PB=PB,
                                 E=PB * WP, TT=16, BITS=bits, AXIS_CHANNEL=axis == "channel")
    return codes, scale, zero
