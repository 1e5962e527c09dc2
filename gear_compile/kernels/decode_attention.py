"""Flash-decoding over a compressed KV cache: one query token per sequence.

Job: out = softmax(cap(q K^T * scale) + mask) V for q [B, Hq, 1, D] (cap: x, or
softcap * tanh(x / softcap), Gemma 2; a per-head sink logit, gpt-oss, joins
the softmax's denominator in the combine step), where K and V
are a layer's `KVStore`s (layout in `segment`), without ever materialising the
dense K/V. Neighbours: `segment` / `store` (the layout read here),
`packing` (planar bit fields), `ops` (routes decode attention here on CUDA).

Algorithm (split-K flash decoding, two kernels):

* The store is four segments: its exact sinks (the prompt's first tokens,
  shadowing the prefill block's), the prefill block (one block of P tokens),
  the decode segment (blocks of n_b tokens in a reserved capacity) and the
  exact buffer (one block of n_b tokens). `_partial_kernel` is launched once
  per segment; each program takes one (batch, KV head) and a contiguous range
  of "work items", an item being one tile of BT tokens inside one block. Tiles
  never straddle a block, because the low-rank factor B and the K outliers are
  per block: a block of n_b = 20 tokens is one 32-token tile with 12 masked
  rows (we iterate block by block rather than gathering per-token block ids, so
  each block's B is read once per tile, not once per token).
* All G = Hq / Hkv query heads of a KV head are the rows of one [GP, E] q tile
  (GP = G padded to >= 16 rows for tl.dot), so each K/V byte is read once.
* Codes are unpacked in registers: a [BT, W] byte tile is shifted by every
  field at once into [BT, PB, W] and flattened, giving an "extended channel"
  axis e = field * WP + byte (channel field * W + byte, see `packing`). q, the
  scales and the accumulator all live on that axis, so no interleaving is done.
* GEAR terms: low-rank K adds ((q . B_blk) s) . A_t to the scores and low-rank
  V adds ((p . A) s) . B_blk^T to the accumulator (A and B int8, s the block's
  fp32 scale per rank): two tl.dots each, the rank padded to 16 with zeros,
  instead of a dense [BT, D] rebuild (one reduction across the tile per rank
  was 14-23 % slower on an H100). Outliers are int8 counts of units of their
  group's step (`outliers.steps`; OUT_UNIT steps a unit): a sparse [BT, E] tile added to
  the codes before the scales apply, folded or not, so they cost no dot of
  their own. V: 2k channel indices per token. K: per block, 2k token
  offsets per channel, sorted, so a tile's entries are one run per channel
  that continues where the previous tile's stopped; only a program that
  starts mid-block binary-searches for its place. A block over SPAN tokens
  stores offsets within SPAN-token spans and each span's end entry (tiles,
  powers of two up to 64, never cross a span). A 32k-token prefill block
  thus costs no scratch and no atomics (an earlier version pre-scattered its
  2 % outliers into a [B, Hq, P] fp32 score correction: 28 % more bytes for
  GEAR-2 at batch 16, context 32k, and 43M atomic adds).
* Online softmax in base 2 (q is pre-scaled by scale * log2 e); each program
  writes its normalised partial output and log-sum-exp, `_combine_kernel`
  merges the partials of every segment.

The grid depends only on static shapes (segment capacities, the sinks'
count); the live lengths (prefill, decode, buffer tokens) are read inside the
kernel from a device tensor, so one compiled graph / CUDA graph serves every
decode step.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .. import outliers
from ..compressed_kv import KVStore
from ..config import CodecConfig
from ..packing import packed_width
from ..segment import Segment, SegmentLayout
from ..store import KERNEL_PARTS

_LOG2E = 1.4426950408889634           # the kernels compute exp2: natural-log quantities are scaled by it
LOG2E: tl.constexpr = tl.constexpr(_LOG2E)     # the same, inside the kernels
SPAN: tl.constexpr = tl.constexpr(256)   # tokens a one-byte K-outlier offset spans (the layout before tile-CSR records; goes with the walk)


@triton.jit
def _codes_tile(codes, t, ok_t, W: tl.constexpr, WP: tl.constexpr, PB: tl.constexpr,
                E: tl.constexpr, BT: tl.constexpr, BITS: tl.constexpr):
    """Unpacked codes [BT, E] (fp32) of tokens t: every bit field of a byte
    tile at once, flattened onto the extended channel axis."""
    j = tl.arange(0, WP)
    byte = tl.load(codes + t[:, None] * W + j[None, :],
                   mask=ok_t[:, None] & (j < W)[None, :], other=0).to(tl.int32)
    shift = tl.arange(0, PB) * BITS
    fields = (byte[:, None, :] >> shift[None, :, None]) & ((1 << BITS) - 1)
    return tl.reshape(fields, (BT, E)).to(tl.float32)


@triton.jit
def _dequant_tile(codes, scale, zero, steps, t, ok_t, ch, ok_c, group,
                  D: tl.constexpr, W: tl.constexpr, WP: tl.constexpr, PB: tl.constexpr,
                  E: tl.constexpr, BT: tl.constexpr, BITS: tl.constexpr, EXACT: tl.constexpr,
                  AXIS_CHANNEL: tl.constexpr):
    """The [BT, E] fp32 tile of tokens t (segment-relative) on the extended
    channel axis: (codes + outliers' steps) * scale + zero (exact storage: the values)."""
    ok = ok_t[:, None] & ok_c[None, :]
    if EXACT:
        x = tl.load(codes + t[:, None] * D + ch[None, :], mask=ok, other=0.0).to(tl.float32)
    else:
        c = _codes_tile(codes, t, ok_t, W, WP, PB, E, BT, BITS) + steps
        if AXIS_CHANNEL:   # one (scale, zero) per channel per `group` tokens
            sidx = (t // group)[:, None] * D + ch[None, :]
        else:              # one (scale, zero) per token per `group` channels
            sidx = t[:, None] * (D // group) + (ch // group)[None, :]
        s = tl.load(scale + sidx, mask=ok, other=0.0).to(tl.float32)
        z = tl.load(zero + sidx, mask=ok, other=0.0).to(tl.float32)
        x = tl.where(ok, c * s + z, 0.0)
    return x


@triton.jit
def _span_run(oend, blk, spans, k2, tile0, ch, ok_c, D: tl.constexpr, SPANS: tl.constexpr):
    """Per channel, the entries of block blk's K-outlier column that lie in
    the span holding the tile (which never crosses one): (first, end), and
    the span's first token offset. Without span ends (SPANS false: blocks up
    to SPAN tokens) that is the whole column."""
    if SPANS:
        span = tile0 // SPAN
        row = (blk * spans + span) * D + ch
        first = tl.load(oend + row - D, mask=ok_c & (ch * 0 + span > 0), other=0).to(tl.int32)
        end = tl.load(oend + row, mask=ok_c, other=0).to(tl.int32)
        return first, end, span * SPAN
    return ch * 0, ch * 0 + k2, tile0 * 0


@triton.jit
def _lower_bound(oidx, blk, k2, first, end, base, ch, ok_c, target, D: tl.constexpr,
                 LOGK: tl.constexpr):
    """Per channel, the first entry in [first, end) of block blk's sorted
    K-outlier column whose token offset (base + stored) is >= target (end if
    none): LOGK = bit_length(k2) halvings."""
    lo = first
    hi = end
    for _ in tl.static_range(LOGK):
        mid = (lo + hi) // 2
        live = lo < hi
        v = base + tl.load(oidx + (blk * k2 + mid) * D + ch, mask=ok_c & live, other=0).to(tl.int32)
        lo = tl.where(live & (v < target), mid + 1, lo)
        hi = tl.where(live & (v >= target), mid, hi)
    return lo


@triton.jit
def _k_outlier_row(oidx, ptr, blk, k2, end, base, tile_end, ch, ok_c, D: tl.constexpr):
    """Each channel's entry at ptr: (its table offset, its token offset, and
    whether it falls before tile_end, i.e. in the tile)."""
    at = (blk * k2 + ptr) * D + ch
    ok = ok_c & (ptr < end)
    tok = tl.where(ok, base + tl.load(oidx + at, mask=ok, other=0).to(tl.int32), tile_end)
    return at, tok, tok < tile_end


@triton.jit
def _k_outlier_tile(oval, oidx, ptr, blk, k2, end, base, t_blk, tile_end, ch, ok_c,
                    D: tl.constexpr, BT: tl.constexpr, E: tl.constexpr):
    """K outliers of the tile's tokens as a dense [BT, E] fp32 tile of units
    (added to the codes), and each channel's next unread entry. Block blk's
    table lists, per channel, 2k token offsets in ascending order
    (`outliers.select`; in a block over SPAN tokens, base + stored, up to the
    span's end entry); ptr is each channel's first
    entry at or after the tile's start, so the tile's entries are the run from
    ptr up to tile_end, read a row at a time for all channels at once (the
    longest run sets the trip count: a few rows at s = 2 %)."""
    sp = tl.zeros([BT, E], tl.float32)
    at, tok, hit = _k_outlier_row(oidx, ptr, blk, k2, end, base, tile_end, ch, ok_c, D)
    while tl.max(hit.to(tl.int32), axis=0) > 0:
        val = tl.load(oval + at, mask=hit, other=0).to(tl.float32)
        sp += tl.where(t_blk[:, None] == tok[None, :], val[None, :], 0.0)
        ptr += hit.to(tl.int32)
        at, tok, hit = _k_outlier_row(oidx, ptr, blk, k2, end, base, tile_end, ch, ok_c, D)
    return sp, ptr


@triton.jit
def _v_outlier_tile(oval, oidx, t, ok_t, ch, k2, BT: tl.constexpr, E: tl.constexpr):
    """V outliers of tokens t as a dense [BT, E] fp32 tile of units (added to
    the codes): each token's table row holds 2k channel indices."""
    sp = tl.zeros([BT, E], tl.float32)
    for o in range(k2):
        oi = tl.load(oidx + t * k2 + o, mask=ok_t, other=0).to(tl.int32)
        ov = tl.load(oval + t * k2 + o, mask=ok_t, other=0).to(tl.float32)
        sp += tl.where(ch[None, :] == oi[:, None], ov[:, None], 0.0)
    return sp


@triton.jit
def _mma(a, b, DT: tl.constexpr, FP32_DOT: tl.constexpr):
    """a @ b with both operands rounded to DT (the query dtype), fp32 accumulate.
    FP32_DOT runs the product in exact fp32 on the rounded values: for fp32 q,
    and for bf16 under the interpreter, whose bf16 dot is wrong."""
    if FP32_DOT:
        return tl.dot(a.to(DT).to(tl.float32), b.to(DT).to(tl.float32), input_precision="ieee")
    return tl.dot(a.to(DT), b.to(DT))


@triton.jit
def _low_rank_tile(A, B, S, t, ok_t, blk, ch, ok_c, D: tl.constexpr, R: tl.constexpr,
                   RP: tl.constexpr):
    """Block blk's low-rank factors for the tile's tokens t: B_blk [E, RP],
    its per-rank scales [RP] and A_t [BT, RP] (fp32; ranks past R are zero, so
    the products run at tl.dot's smallest width instead of one reduction
    across the tile per rank)."""
    r = tl.arange(0, RP)
    ok_r = r < R
    b = tl.load(B + (blk * D + ch)[:, None] * R + r[None, :], mask=ok_c[:, None] & ok_r[None, :],
                other=0).to(tl.float32)
    s = tl.load(S + blk * R + r, mask=ok_r, other=0.0).to(tl.float32)
    a = tl.load(A + t[:, None] * R + r[None, :], mask=ok_t[:, None] & ok_r[None, :],
                other=0).to(tl.float32)
    return b, s, a


@triton.jit
def _tile_scores(q, Kc, Ks, Kz, Ka, Kb, Kls, ksp, t, ok_t, blk, ch, ok_c, k_group, stats_row,
                 DT: tl.constexpr, D: tl.constexpr, W: tl.constexpr, WP: tl.constexpr,
                 PB: tl.constexpr, E: tl.constexpr, BT: tl.constexpr, BITS: tl.constexpr,
                 EXACT: tl.constexpr, K_CHANNEL: tl.constexpr, K_FOLD: tl.constexpr,
                 R: tl.constexpr, RP: tl.constexpr, FP32_DOT: tl.constexpr):
    """q . k_t for the tile's tokens t ([GP, BT], base-2 units): the codes
    with the outliers' units ksp, then the low-rank term of block blk.
    stats_row: the tile's row of (scale, zero) where they fold (K_FOLD)."""
    if K_FOLD:
        # the tile shares one (scale, zero) row: q.k_t = (q*s).c_t + q.z, so the
        # codes go to tl.dot as they are (with the outliers' units: exact in
        # fp16, and in bf16 below 8 bits)
        c = _codes_tile(Kc, t, ok_t, W, WP, PB, E, BT, BITS) + ksp
        sk = tl.load(Ks + stats_row * D + ch, mask=ok_c, other=0.0).to(tl.float32)
        zk = tl.load(Kz + stats_row * D + ch, mask=ok_c, other=0.0).to(tl.float32)
        s = _mma(q * sk[None, :], tl.trans(c), DT, FP32_DOT) + tl.sum(q * zk[None, :], axis=1)[:, None]
    else:
        k = _dequant_tile(Kc, Ks, Kz, ksp, t, ok_t, ch, ok_c, k_group,
                          D, W, WP, PB, E, BT, BITS, EXACT, K_CHANNEL)
        s = _mma(q, tl.trans(k), DT, FP32_DOT)
    if R > 0:   # low-rank K: q . (A_t diag(s) B_blk^T) = ((q . B_blk) s) . A_t, two small products
        bk, sr, a = _low_rank_tile(Ka, Kb, Kls, t, ok_t, blk, ch, ok_c, D, R, RP)
        s += _mma(_mma(q, bk, DT, FP32_DOT) * sr[None, :], tl.trans(a), DT, FP32_DOT)
    return s


@triton.jit
def _masked(s, Mask, row0, pos, ok_g, ok_t, mask_sl, MASK_KIND: tl.constexpr):
    """s with the attention mask applied: row0 + pos * mask_sl addresses each
    (query head, key position); keys before the mask's first column (pos < 0,
    a sliding window's short mask) are hidden."""
    ok_m = ok_g[:, None] & (ok_t & (pos >= 0))[None, :]
    mp = Mask + row0[:, None] + pos[None, :] * mask_sl
    if MASK_KIND == 1:   # bool, True = keep
        keep = tl.load(mp, mask=ok_m, other=1)
        s = tl.where(keep != 0, s, float("-inf"))
    else:                # additive, natural log: times log2(e) for base 2
        s += tl.load(mp, mask=ok_m, other=0.0).to(tl.float32) * LOG2E
    return tl.where((pos >= 0)[None, :], s, float("-inf"))


@triton.jit
def _tile_values(p, Vc, Vs, Vz, Va, Vb, Vls, vsp, t, ok_t, blk, ch, ok_c, v_group,
                 DT: tl.constexpr, D: tl.constexpr, W: tl.constexpr, WP: tl.constexpr,
                 PB: tl.constexpr, E: tl.constexpr, BT: tl.constexpr, BITS: tl.constexpr,
                 EXACT: tl.constexpr, V_CHANNEL: tl.constexpr, V_FOLD: tl.constexpr,
                 R: tl.constexpr, RP: tl.constexpr, FP32_DOT: tl.constexpr):
    """p . v over the tile's tokens t ([GP, E]): the codes with the outliers'
    units vsp, then the low-rank term of block blk."""
    if V_FOLD:
        # one (scale, zero) per token: p.v = (p*s).c + (p.z) on every channel
        c = _codes_tile(Vc, t, ok_t, W, WP, PB, E, BT, BITS) + vsp
        sv = tl.load(Vs + t, mask=ok_t, other=0.0).to(tl.float32)
        zv = tl.load(Vz + t, mask=ok_t, other=0.0).to(tl.float32)
        out = _mma(p * sv[None, :], c, DT, FP32_DOT) + tl.sum(p * zv[None, :], axis=1)[:, None]
    else:
        v = _dequant_tile(Vc, Vs, Vz, vsp, t, ok_t, ch, ok_c, v_group,
                          D, W, WP, PB, E, BT, BITS, EXACT, V_CHANNEL)
        out = _mma(p, v, DT, FP32_DOT)
    if R > 0:   # low-rank V: sum_t p_t A_t diag(s) B_blk^T = ((p . A) s) . B_blk^T
        bv, sr, a = _low_rank_tile(Va, Vb, Vls, t, ok_t, blk, ch, ok_c, D, R, RP)
        out += _mma(_mma(p, a, DT, FP32_DOT) * sr[None, :], tl.trans(bv), DT, FP32_DOT)
    return out


@triton.jit
def _partial_kernel(Q, Kc, Ks, Kz, Ka, Kb, Kls, Kov, Koi, Koe, Vc, Vs, Vz, Va, Vb, Vls, Vov, Voi, Voe,
                    Lens, Mask, PO, PLSE,
                    qk_scale, cap, Hkv, N, NBLK, BLOCK, TPB, ITEMS, SPLIT0, S_TOTAL, T_NEW, N_SINK,
                    k_group, v_group, k_k2, v_k2, k_spans, mask_sb, mask_sh, mask_sl, mask_len,
                    SEG: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                    W: tl.constexpr, WP: tl.constexpr, PB: tl.constexpr, E: tl.constexpr,
                    BITS: tl.constexpr, EXACT: tl.constexpr, K_CHANNEL: tl.constexpr,
                    V_CHANNEL: tl.constexpr, R: tl.constexpr, RP: tl.constexpr, BT: tl.constexpr,
                    MASK_KIND: tl.constexpr, FP32_DOT: tl.constexpr, K_OUT: tl.constexpr,
                    LOGK: tl.constexpr, K_SPANS: tl.constexpr, V_OUT: tl.constexpr, K_FOLD: tl.constexpr,
                    V_FOLD: tl.constexpr, SOFTCAP: tl.constexpr, OUT_UNIT: tl.constexpr):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // Hkv
    kvh = pid_bh % Hkv
    n_pre = tl.load(Lens).to(tl.int32)
    n_dec = tl.load(Lens + 1).to(tl.int32)
    n_buf = tl.load(Lens + 2).to(tl.int32)
    t_first = n_pre * 0  # the segment's first token read
    if SEG == 0:         # the sinks shadow the block's first N_SINK tokens
        n_valid = n_pre
        pos0 = n_pre * 0
        t_first += N_SINK
    elif SEG == 1:
        n_valid = n_dec
        pos0 = n_pre
    elif SEG == 2:
        n_valid = n_buf
        pos0 = n_pre + n_dec
    elif SEG == 3:       # the call's new token, not yet in the store
        n_valid = n_pre * 0 + T_NEW
        pos0 = n_pre + n_dec + n_buf
    else:                # the store's exact sinks: the first N_SINK keys
        n_valid = n_pre * 0 + N_SINK
        pos0 = n_pre * 0
    # key position -> mask column: the mask's last column is the newest key (a
    # longer mask starts earlier; a shorter one, a sliding window's, hides the keys before it)
    pos0 += mask_len - (n_pre + n_dec + n_buf + T_NEW)

    # per-(batch, KV head) base pointers; all parts are contiguous [B, H, ...]
    head = pid_bh.to(tl.int64)
    if EXACT:
        Kc += head * N * D
        Vc += head * N * D
    else:
        Kc += head * N * W
        Vc += head * N * W
        if K_CHANNEL:
            Ks += head * (N // k_group) * D
            Kz += head * (N // k_group) * D
        else:
            Ks += head * N * (D // k_group)
            Kz += head * N * (D // k_group)
        if V_CHANNEL:
            Vs += head * (N // v_group) * D
            Vz += head * (N // v_group) * D
        else:
            Vs += head * N * (D // v_group)
            Vz += head * N * (D // v_group)
        Kov += head * NBLK * k_k2 * D
        Koi += head * NBLK * k_k2 * D
        Koe += head * NBLK * k_spans * D
        Vov += head * N * v_k2
        Voi += head * N * v_k2
        if R > 0:
            Ka += head * N * R
            Va += head * N * R
            Kb += head * NBLK * D * R
            Vb += head * NBLK * D * R
            Kls += head * NBLK * R
            Vls += head * NBLK * R

    g = tl.arange(0, GP)
    ok_g = g < G
    qrow = (b * Hkv * G + kvh * G + g).to(tl.int64)     # q heads of this KV head
    e = tl.arange(0, E)
    ch = (e // WP) * W + e % WP                           # extended axis -> channel
    ok_c = (e % WP < W) & (ch < D)
    # the scores in fp32 whatever the floats arrive as: Triton's launcher passes fp32, Inductor's
    # fp64, and torch's mutation analysis traces them as Python floats
    qk_scale = tl.cast(qk_scale, tl.float32)
    cap = tl.cast(cap, tl.float32)
    q = tl.load(Q + qrow[:, None] * D + ch[None, :], mask=ok_g[:, None] & ok_c[None, :],
                other=0.0).to(tl.float32) * qk_scale
    DT: tl.constexpr = Q.dtype.element_ty

    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, E], tl.float32)
    kptr = ch * 0          # per channel: next unread entry of the block's K-outlier table
    # items past the live length are skipped (a bound read from memory cannot
    # be a loop bound under the interpreter), so idle programs write an empty partial
    start = split * ITEMS
    end = tl.minimum(start + ITEMS, tl.cdiv(n_valid, BLOCK) * TPB)
    for it in range(0, ITEMS):
        item = start + it
        if item < end:
            blk = item // TPB
            t_blk = (item % TPB) * BT + tl.arange(0, BT)
            t = blk * BLOCK + t_blk
            ok_t = (t_blk < BLOCK) & (t < n_valid) & (t >= t_first)

            ksp = tl.zeros([BT, E], tl.float32)   # K outliers' units, joining the codes
            if K_OUT:
                tile0 = (item % TPB) * BT
                # the entries of the tile's span, the span's first token offset
                run0, run_end, span0 = _span_run(Koe, blk, k_spans, k_k2, tile0, ch, ok_c, D, K_SPANS)
                if tile0 == 0:       # a block's first tile starts its table
                    kptr = kptr * 0
                elif it == 0:        # a program starting mid-block searches for its place
                    kptr = _lower_bound(Koi, blk, k_k2, run0, run_end, span0, ch, ok_c, tile0, D, LOGK)
                ksp, kptr = _k_outlier_tile(Kov, Koi, kptr, blk, k_k2, run_end, span0, t_blk,
                                            tile0 + BT, ch, ok_c, D, BT, E)
                ksp = ksp * OUT_UNIT
            s = _tile_scores(q, Kc, Ks, Kz, Ka, Kb, Kls, ksp, t, ok_t, blk, ch, ok_c, k_group,
                             (blk * BLOCK + (item % TPB) * BT) // k_group, DT, D, W, WP, PB, E, BT,
                             BITS, EXACT, K_CHANNEL, K_FOLD, R, RP, FP32_DOT)
            if SOFTCAP:
                # s is in base-2 units (q carries log2 e); so is cap: cap tanh(s / cap)
                s = cap * (1.0 - 2.0 / (tl.exp(2.0 * s / cap) + 1.0))
            if MASK_KIND != 0:
                s = _masked(s, Mask, b * mask_sb + (kvh * G + g) * mask_sh, pos0 + t, ok_g, ok_t,
                            mask_sl, MASK_KIND)
            s = tl.where(ok_t[None, :], s, float("-inf"))

            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None]

            vsp = tl.zeros([BT, E], tl.float32)   # V outliers' units, joining the codes
            if V_OUT:
                vsp = _v_outlier_tile(Vov, Voi, t, ok_t, ch, v_k2, BT, E) * OUT_UNIT
            acc += _tile_values(p, Vc, Vs, Vz, Va, Vb, Vls, vsp, t, ok_t, blk, ch, ok_c, v_group, DT,
                                D, W, WP, PB, E, BT, BITS, EXACT, V_CHANNEL, V_FOLD, R, RP, FP32_DOT)
            m_i = m_new

    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    slot = qrow * S_TOTAL + SPLIT0 + split
    tl.store(PO + slot[:, None] * D + ch[None, :], o, mask=ok_g[:, None] & ok_c[None, :])
    tl.store(PLSE + slot, lse, mask=ok_g)


@triton.jit
def _combine_kernel(PO, PLSE, Out, Sinks, S_TOTAL, Hq, D: tl.constexpr, DP: tl.constexpr,
                    SC: tl.constexpr, SINKS: tl.constexpr):
    """Merge the S_TOTAL partials of one (batch, q head) by their log-sum-exp;
    with SINKS, the head's sink logit (natural base) starts the denominator."""
    row = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, DP)
    ok_d = d < D
    if SINKS:
        m = tl.load(Sinks + row % Hq).to(tl.float32) * LOG2E    # to base 2
        l = tl.full([], 1.0, tl.float32)
    else:
        m = tl.full([], float("-inf"), tl.float32)
        l = tl.zeros([], tl.float32)
    acc = tl.zeros([DP], tl.float32)
    for s0 in range(0, S_TOTAL, SC):
        s = s0 + tl.arange(0, SC)
        ok = s < S_TOTAL
        lse = tl.load(PLSE + row * S_TOTAL + s, mask=ok, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(lse, axis=0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        w = tl.exp2(lse - m_use)
        o = tl.load(PO + (row * S_TOTAL + s)[:, None] * D + d[None, :],
                    mask=ok[:, None] & ok_d[None, :], other=0.0)
        alpha = tl.exp2(m - m_use)
        acc = acc * alpha + tl.sum(w[:, None] * o, axis=0)
        l = l * alpha + tl.sum(w, axis=0)
        m = m_new
    tl.store(Out + row * D + d, (acc / l).to(Out.dtype.element_ty), mask=ok_d)


# Launch heuristics. Programs per (batch, KV head): enough for about four per
# SM, so that each SM has programs to switch between while one waits on
# memory. Tokens per tile: >= 16 for tl.dot; up to 64, since on an H100 the
# kernel is latency-bound, not bandwidth-bound, and moving more bytes per
# iteration pays (benchmarks/results/decode_attention_sweep_h100.md, batch 16,
# context 32k: 32 -> 64 tokens took none 1171 -> 961 us, kcvt-4 2063 -> 1284,
# kivi-2 2174 -> 2114, gear-4 11468 -> 8890; 128 was slower for gear-4).
# Warps: 8 once a tile holds >= 4096 values (enough independent loads for 256
# threads), else 4.
PROGRAMS_PER_SM = 4
TILE_MIN, TILE_MAX = 16, 64
WIDE_TILE = 4096
COMBINE_CHUNK = 64     # partials the combine kernel merges per iteration (registers: SC x DP)


@functools.lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4   # interpreter: few programs run fastest


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@dataclass(frozen=True)
class _SegmentLaunch:
    """One `_partial_kernel` launch: a segment of the store (or the call's
    new token) and how its tokens split into tiles and work items."""

    seg_id: int                  # 0 prefill block, 1 decode blocks, 2 buffer, 3 the new token, 4 sinks
    k: Segment | None            # compressed parts (None: exact values, `exact_k`)
    v: Segment | None
    k_layout: SegmentLayout | None
    v_layout: SegmentLayout | None
    capacity: int                # token slots
    block: int                   # tokens per block: the low-rank / K-outlier unit

    @property
    def exact(self) -> bool:
        return self.k_layout is None or self.k_layout.exact

    @property
    def tile(self) -> int:
        return min(TILE_MAX, max(TILE_MIN, _pow2(self.block)))

    @property
    def tiles_per_block(self) -> int:
        return triton.cdiv(self.block, self.tile)

    @property
    def items(self) -> int:
        return self.capacity // self.block * self.tiles_per_block


def _segment_launches(ks: KVStore, vs: KVStore, k_new: torch.Tensor | None) -> list[_SegmentLaunch]:
    """The sinks and the prefill block (where the prompt had them), the
    decode blocks, the buffer and the call's new token."""
    out = []
    if n_sink := ks.sink.shape[2]:
        out.append(_SegmentLaunch(4, None, None, None, None, n_sink, n_sink))
    if n_pre := ks.prefill.codes.shape[2]:
        out.append(_SegmentLaunch(0, ks.prefill, vs.prefill, ks.p_layout, vs.p_layout, n_pre, n_pre))
    out.append(_SegmentLaunch(1, ks.decode, vs.decode, ks.d_layout, vs.d_layout,
                              ks.decode.codes.shape[2], ks.d_layout.block))
    n_buf = ks.buffer.shape[2]
    out.append(_SegmentLaunch(2, None, None, None, None, n_buf, max(1, n_buf)))
    if k_new is not None:
        out.append(_SegmentLaunch(3, None, None, None, None, k_new.shape[2], max(1, k_new.shape[2])))
    return out


_PARTS = KERNEL_PARTS          # the parts both kernels read, in the one order store.py declares


def _pointers(seg: Segment | None, exact: torch.Tensor | None, q: torch.Tensor) -> list[torch.Tensor]:
    """The kernel's part pointers of one segment in `_PARTS` order (exact
    values in the codes' place; q stands in for absent parts)."""
    parts = [exact] + [None] * (len(_PARTS) - 1) if seg is None else [getattr(seg, name) for name in _PARTS]
    return [(t if t is not None else q).contiguous() for t in parts]


def _stats_group(layout: SegmentLayout) -> int:
    return layout.token_group if layout.spec.axis == "channel" else layout.channel_group


def _mask_args(attn_mask: torch.Tensor | None, q: torch.Tensor, B: int, Hq: int):
    """(mask tensor, kind 0 none / 1 bool / 2 additive, strides (b, h, l), length)."""
    if attn_mask is None:
        return q, 0, (0, 0, 0), 0
    m = attn_mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    mlen = m.shape[-1]
    kind = 1 if m.dtype == torch.bool else 2
    if kind == 1:   # Triton reads bytes; Inductor cannot lower a view of bool as uint8, a cast it fuses
        m = m.to(torch.uint8)
    m = m.expand(B, Hq, 1, mlen)
    return m, kind, (m.stride(0), m.stride(1), m.stride(3)), mlen


def decode_attention_launch(q: torch.Tensor, k_parts: list[torch.Tensor],
                            v_parts: list[torch.Tensor], k_new: torch.Tensor | None,
                            v_new: torch.Tensor | None, attn_mask: torch.Tensor | None,
                            scale: float, config: str, wrap=None,
                            num_splits: int | None = None, softcap: float = 0.0,
                            sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Run the kernels (eagerly, or through `wrap` = torch.library.wrap_triton
    inside the triton_op). q [B, Hq, 1, D]; k_parts / v_parts in
    `StoreLayout.names` order; k_new / v_new [B, Hkv, 1, D] (or None): the
    call's new token, attended after the store; attn_mask None, bool (True =
    keep) or additive, broadcastable to [B, Hq, 1, L_mask], its last column
    the newest key (keys before its first column are hidden: a sliding
    window). `num_splits`: programs per (batch, KV head) over the token range
    (default: about PROGRAMS_PER_SM per SM)."""
    cfg = CodecConfig.from_json(config)
    ks, vs = KVStore(cfg, "k", k_parts), KVStore(cfg, "v", v_parts)
    B, Hq, T, D = q.shape
    if T != 1:
        raise ValueError(f"gear decode attention: one query token per sequence, got {T}.")
    Hkv = ks.buffer.shape[1]
    if Hq % Hkv:
        raise ValueError(f"gear decode attention: {Hq} query heads for {Hkv} KV heads.")
    if sinks is not None and sinks.numel() != Hq:
        raise ValueError(f"gear decode attention: sinks must hold one logit per query head ({Hq}), "
                         f"got {sinks.numel()}.")
    launch = wrap if wrap is not None else (lambda kernel: kernel)
    q_layout, q = q, q.contiguous()

    # every segment takes the same work items (tiles) per program, so long
    # segments get more programs
    segments = _segment_launches(ks, vs, k_new)
    if num_splits is None:
        num_splits = max(1, triton.cdiv(PROGRAMS_PER_SM * _sm_count(q.device), B * Hkv))
    items = max(1, triton.cdiv(sum(s.items for s in segments), num_splits))
    s_total = sum(triton.cdiv(s.items, items) for s in segments)
    po = torch.empty(B, Hq, s_total, D, dtype=torch.float32, device=q.device)
    plse = torch.empty(B, Hq, s_total, dtype=torch.float32, device=q.device)
    shared = _SharedArgs(q, ks.lengths.to(q.device), *_mask_args(attn_mask, q, B, Hq), po, plse,
                         scale, softcap, Hkv, items, s_total, 0 if k_new is None else k_new.shape[2],
                         ks.sink.shape[2], ks.d_layout.spec.bits)
    split0 = 0
    for seg in segments:
        exact_k, exact_v = {2: (ks.buffer, vs.buffer), 3: (k_new, v_new), 4: (ks.sink, vs.sink)}.get(
            seg.seg_id, (None, None))
        splits = triton.cdiv(seg.items, items)
        _launch_partial(launch, shared, seg, _pointers(seg.k, exact_k, q), _pointers(seg.v, exact_v, q),
                        (B * Hkv, splits), split0)
        split0 += splits

    out = torch.empty_like(q)
    launch(_combine_kernel)[(B * Hq,)](po, plse, out, q if sinks is None else sinks.contiguous(),
                                       s_total, Hq, D=D, DP=_pow2(D),
                                       SC=min(COMBINE_CHUNK, max(16, _pow2(s_total))), SINKS=sinks is not None)
    return out if q_layout.is_contiguous() else torch.empty_like(q_layout).copy_(out)


@dataclass(frozen=True)
class _SharedArgs:
    """What every segment's launch shares."""

    q: torch.Tensor
    lengths: torch.Tensor
    mask: torch.Tensor
    mask_kind: int
    mask_strides: tuple
    mask_len: int
    partial_out: torch.Tensor
    partial_lse: torch.Tensor
    scale: float
    softcap: float
    kv_heads: int
    items: int
    s_total: int
    new_tokens: int
    sink_tokens: int
    bits: int


def _partial_meta(seg: _SegmentLaunch, q_dtype: torch.dtype, Hq: int, Hkv: int, D: int, bits: int,
                  mask_kind: int, softcap: float) -> tuple[dict, dict, int]:
    """`_partial_kernel`'s runtime scalars and constexprs for one segment, and
    its warp count."""
    kl, vl, exact, block, bt = seg.k_layout, seg.v_layout, seg.exact, seg.block, seg.tile
    if exact:       # the sinks, the buffer or the new token (or method none): values of any float dtype
        k_group = v_group = 1
        k_k2 = v_k2 = rank = k_spans = 0
        nblk = 1
        w, pb, wp = D, 1, max(16, _pow2(D))
        e = wp
    else:
        k_group, v_group = _stats_group(kl), _stats_group(vl)
        k_k2, v_k2, k_spans = 2 * kl.outliers_per_side, 2 * vl.outliers_per_side, kl.spans
        rank, nblk = kl.rank, seg.capacity // block
        w, pb = packed_width(D, bits), 8 // bits
        wp = max(_pow2(w), 16 // pb)
        e = pb * wp
    # fold scale/zero into the dot products where one (scale, zero) covers a K
    # tile's rows (a channel-axis group spanning the tile) or a V token's whole
    # row; outliers' steps join the codes either way
    fold_k = (not exact and kl.spec.axis == "channel"
              and (k_group == block or (k_group % bt == 0 and block % bt == 0)))
    fold_v = not exact and vl.spec.axis == "token" and v_group == D
    fp32_dot = q_dtype == torch.float32 or (
        q_dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1")
    scalars = dict(N=seg.capacity, NBLK=nblk, BLOCK=block, TPB=seg.tiles_per_block,
                   k_group=k_group, v_group=v_group, k_k2=k_k2, v_k2=v_k2, k_spans=k_spans)
    consts = dict(
        SEG=seg.seg_id, G=Hq // Hkv, GP=max(16, _pow2(Hq // Hkv)), D=D, W=w, WP=wp, PB=pb, E=e,
        BITS=0 if exact else bits, EXACT=exact,
        K_CHANNEL=not exact and kl.spec.axis == "channel",
        V_CHANNEL=not exact and vl.spec.axis == "channel",
        R=rank, RP=max(16, _pow2(rank)), BT=bt, MASK_KIND=mask_kind, FP32_DOT=fp32_dot, K_OUT=k_k2 > 0,
        LOGK=k_k2.bit_length(), K_SPANS=k_spans > 0, V_OUT=v_k2 > 0, K_FOLD=fold_k, V_FOLD=fold_v,
        SOFTCAP=softcap > 0, OUT_UNIT=outliers.unit(bits))
    return scalars, consts, 8 if bt * e >= WIDE_TILE else 4


def _launch_partial(launch, a: _SharedArgs, seg: _SegmentLaunch, k_ptrs: list, v_ptrs: list,
                    grid: tuple, split0: int) -> None:
    """One `_partial_kernel` launch over `seg`'s tiles."""
    q = a.q
    B, Hq, _, D = q.shape
    sc, consts, warps = _partial_meta(seg, q.dtype, Hq, a.kv_heads, D, a.bits, a.mask_kind, a.softcap)
    ms = a.mask_strides
    launch(_partial_kernel)[grid](
        q, *k_ptrs, *v_ptrs, a.lengths, a.mask, a.partial_out, a.partial_lse,
        a.scale * _LOG2E, a.softcap * _LOG2E, a.kv_heads, sc["N"], sc["NBLK"], sc["BLOCK"], sc["TPB"],
        a.items, split0, a.s_total, a.new_tokens, a.sink_tokens, sc["k_group"], sc["v_group"],
        sc["k_k2"], sc["v_k2"], sc["k_spans"], ms[0], ms[1], ms[2], a.mask_len,
        **consts, num_warps=warps)


# ---- what the launcher can produce, for the no-GPU sm_90a build checks ----

@dataclass(frozen=True)
class BuildSpec:
    """One kernel configuration as `triton.compile(ASTSource(fn, signature,
    constexprs), target=GPUTarget("cuda", 90, 32), options=dict(num_warps=...,
    num_stages=...))` takes it (tests/test_kernel_sm90_build.py,
    benchmarks/kernel_model.py)."""

    name: str
    fn: object                 # the @triton.jit kernel
    signature: dict            # argument name -> Triton type ("*fp16", "i32", "fp32") or "constexpr"
    constexprs: dict
    num_warps: int
    num_stages: int


_BUILD_METHODS = (("none", 16), ("kcvt", 4), ("kcvt", 8), ("kivi", 2), ("kivi", 4), ("per_token", 4),
                  ("gear", 2), ("gear", 4), ("gear_l", 4))
_TORCH_TO_TRITON = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
                    torch.uint8: "u8", torch.int8: "i8", torch.int16: "i16", torch.int32: "i32",
                    torch.int64: "i64"}


def sm90_build_specs(head_dims=(64, 128), context: int = 32768, gqa: int = 4) -> list[BuildSpec]:
    """Every configuration the launcher produces for representative shapes:
    each method / bits in `_BUILD_METHODS` at each head dim, a `context`-token
    prefill block with 4 exact sinks, fp16 queries with `gqa` query heads per
    KV head and a bool mask; plus a bf16 and an fp32 query variant, softcap, and
    the combine kernel with and without sinks. Built from the same layouts and
    `_partial_meta` the launcher uses, so they change together."""
    from ..config import GearConfig
    from ..store import StoreLayout
    specs = []
    variants = [(torch.float16, 1, 0.0)] + [(dt, 2, 30.0) for dt in (torch.bfloat16, torch.float32)]
    for D in head_dims:
        for method, bits in _BUILD_METHODS:
            for qdt, mask_kind, softcap in variants if (method, bits) == ("gear", 4) else variants[:1]:
                cfg = GearConfig(method=method, bits=bits if method != "none" else 4)
                kl, vl = (StoreLayout.build(cfg, kind, D, torch.float16, context, 4) for kind in "kv")
                for seg in _layout_launches(kl, vl):
                    sc, consts, warps = _partial_meta(seg, qdt, gqa * 8, 8, D, kl.decode.spec.bits,
                                                      mask_kind, softcap)
                    sig = _partial_signature(seg, qdt, mask_kind, sc, consts)
                    name = f"partial-{method}{bits}-d{D}-{_TORCH_TO_TRITON[qdt]}-seg{seg.seg_id}"
                    specs.append(BuildSpec(name, _partial_kernel, sig, consts, warps, 1))
    for sinks in (False, True):
        for D in head_dims:
            consts = dict(D=D, DP=_pow2(D), SC=COMBINE_CHUNK, SINKS=sinks)
            sig = {n: "constexpr" if n in consts else "i32" for n in _combine_kernel.arg_names}
            sig.update(PO="*fp32", PLSE="*fp32", Out="*fp16", Sinks="*fp16")
            specs.append(BuildSpec(f"combine-d{D}-sinks{int(sinks)}", _combine_kernel, sig, consts, 4, 1))
    return specs


def _layout_launches(kl, vl) -> list[_SegmentLaunch]:
    """`_segment_launches` from two `StoreLayout`s (a decode capacity of 4 blocks)."""
    out = [_SegmentLaunch(4, None, None, None, None, kl.sink_tokens, kl.sink_tokens)] if kl.sink_tokens else []
    out.append(_SegmentLaunch(0, None, None, kl.prefill, vl.prefill, kl.prefill.block, kl.prefill.block))
    out.append(_SegmentLaunch(1, None, None, kl.decode, vl.decode, 4 * kl.decode.block, kl.decode.block))
    out.append(_SegmentLaunch(2, None, None, None, None, kl.buffer_tokens, kl.buffer_tokens))
    out.append(_SegmentLaunch(3, None, None, None, None, 1, 1))
    return out


def _partial_signature(seg: _SegmentLaunch, qdt: torch.dtype, mask_kind: int, scalars: dict,
                       consts: dict) -> dict:
    """`_partial_kernel`'s argument types for one segment's launch."""
    q = "*" + _TORCH_TO_TRITON[qdt]
    sig = {}
    for prefix, layout in (("K", seg.k_layout), ("V", seg.v_layout)):
        dtypes = {} if seg.exact else {p.name: p.dtype for p in layout.parts}
        for arg, part in zip(("c", "s", "z", "a", "b", "ls", "ov", "oi", "oe"), _PARTS):
            dt = dtypes.get(part)
            sig[prefix + arg] = "*" + _TORCH_TO_TRITON[dt] if dt is not None else q
    sig.update(Q=q, Lens="*i64", Mask=(q if mask_kind == 2 else "*u8") if mask_kind else q,
               PO="*fp32", PLSE="*fp32", qk_scale="fp32", cap="fp32")
    for n in _partial_kernel.arg_names:
        if n in consts:
            sig[n] = "constexpr"
        elif n not in sig:
            sig[n] = "i32"
    return {n: sig[n] for n in _partial_kernel.arg_names}


@torch.library.triton_op("gear::attention_triton", mutates_args=())
def attention_triton(q: torch.Tensor, k_parts: list[torch.Tensor], v_parts: list[torch.Tensor],
                     k_new: torch.Tensor | None, v_new: torch.Tensor | None,
                     attn_mask: torch.Tensor | None, scale: float, is_causal: bool,
                     config: str, softcap: float = 0.0,
                     sinks: torch.Tensor | None = None) -> torch.Tensor:
    """gear::attention_triton: the launcher with its kernels wrapped, so
    Inductor sees (and emits) them in its output code. One query token: a
    single row needs no causal mask, so is_causal has no effect."""
    return decode_attention_launch(q, k_parts, v_parts, k_new, v_new, attn_mask, scale, config,
                                   wrap=torch.library.wrap_triton, softcap=softcap, sinks=sinks)
