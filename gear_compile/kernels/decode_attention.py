"""Flash-decoding over a compressed KV cache: one query token per sequence.

Job: out = softmax(cap(q K^T * scale) + mask) V for q [B, Hq, 1, D] (cap: x, or
softcap * tanh(x / softcap), Gemma 2; a per-head sink logit, gpt-oss, joins
the softmax's denominator in the combine step), where K and V are a layer's
`KVStore`s (layout in `segment`), without ever materialising the dense K/V.
Neighbours: `decode_tiles` (the inner loops: dequantization, GEAR terms,
online softmax), `decode_plan` (constexprs, split count, autotune configs),
`segment` / `store` (the layout read here), `ops` (routes decode attention
here on CUDA).

Algorithm (split-K flash decoding, one launch plus one combine):

* A (batch, KV head)'s keys are one flat work list of tiles over five
  segments, in key order: the exact sinks (the prompt's first tokens,
  shadowing the prefill block's), the prefill block (one block of P tokens),
  the decode blocks (n_b tokens each in a reserved capacity; a tile never
  straddles a block, since the low-rank B and the K outliers are per block),
  the exact buffer, and the call's new token. The grid is (B * Hkv, S): the
  list's live length is computed in the kernel from the store's lengths (a
  device tensor), and program s takes the s-th of S equal contiguous ranges,
  running one pipelined pass (`decode_tiles`) per segment its range meets.
  S comes from the SM count and the static work (`decode_plan.num_splits`,
  FlashAttention-2's wave-efficiency rule), so the grid depends on static
  shapes only and one compiled graph / CUDA graph serves every decode step.
  With K outlier records (`decode_plan.overflow_programs`) the grid is
  (B * Hkv, 2S): program S + s reads only the tiles of range s whose records
  overflow their window (`decode_tiles`), which program s skipped, and
  writes a partial of its own (no live tile: an empty partial, lse -inf).
* All G = Hq / Hkv query heads of a KV head are the rows of one [GP, E] q
  tile (GP = G padded to >= 16 rows for tl.dot), so each K/V byte is read
  once.
* Online softmax in base 2 (q is pre-scaled by scale * log2 e); each program
  writes its normalised partial output and log-sum-exp, `_combine_kernel`
  merges the S partials of each query row.
* The prefill tile, warps and pipeline stages are autotuned on a GPU over
  `decode_plan.TILE_CONFIGS`, pruned by its register / shared-memory model and
  keyed on head dim, bits, method (ranks, outliers, stats axes) and GQA ratio;
  the interpreter runs `DEFAULT_TILE_CONFIG`.

`sm90_build_specs()` lists every configuration the launcher can produce, for
the no-GPU sm_90a build checks (tests/test_kernel_sm90_build.py,
benchmarks/kernel_model.py).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..compressed_kv import KVStore
from ..config import CodecConfig
from ..store import KERNEL_PARTS
from . import decode_plan
from .decode_plan import DEFAULT_TILE_CONFIG, TILE_CONFIGS, TileConfig, pow2
from .decode_tiles import LOG2E, compressed_pass, exact_pass

_LOG2E = 1.4426950408889634           # the kernel computes exp2: natural-log quantities are scaled by it


@triton.jit
def _segment_range(w0, w1, off, n):
    """The part [lo, hi) of a segment's n items (starting at `off` in the
    work list) that the work range [w0, w1) covers."""
    lo = tl.minimum(tl.maximum(w0 - off, 0), n)
    hi = tl.minimum(tl.maximum(w1 - off, 0), n)
    return lo, hi


@triton.jit
def _query(Q, qrow, ch, ok_g, ok_c, qk_scale, D: tl.constexpr):
    """The query rows [GP, E] of this KV head, fp32, times qk_scale: loaded
    by each pass that reads them (L2-resident), so that they are not live
    in registers across the other passes' loops (at 255 registers ptxas
    spilled them around every loop: GEAR-2 d 128, 8 warps)."""
    return tl.load(Q + qrow[:, None] * D + ch[None, :], mask=ok_g[:, None] & ok_c[None, :],
                   other=0.0).to(tl.float32) * qk_scale


@triton.jit
def _segment_parts(head, N, NBLK, Kc, Ks, Kz, Ka, Kb, Kls, Kov, Koi, Kop,
                   Vc, Vs, Vz, Va, Vb, Vls, Vov, Voi, k_group, v_group, k_k2,
                   D: tl.constexpr, W: tl.constexpr, K_CHANNEL: tl.constexpr,
                   V_CHANNEL: tl.constexpr, R: tl.constexpr, VK2: tl.constexpr):
    """A compressed segment's part pointers moved to head `head` (parts are
    contiguous [B, H, ...], N token slots, NBLK blocks)."""
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
    Kov += head * NBLK * k_k2 * D           # K outlier records: 2k * D per block
    Koi += head * NBLK * k_k2 * D
    Kop += head * NBLK * (tl.cdiv(N // NBLK, 16) + 1)   # and a pointer per 16 tokens, plus one
    Vov += head * N * VK2
    Voi += head * N * VK2
    if R > 0:
        Ka += head * N * R
        Va += head * N * R
        Kb += head * NBLK * D * R
        Vb += head * NBLK * D * R
        Kls += head * NBLK * R
        Vls += head * NBLK * R
    return Kc, Ks, Kz, Ka, Kb, Kls, Kov, Koi, Kop, Vc, Vs, Vz, Va, Vb, Vls, Vov, Voi


@triton.jit
def _attention_kernel(
        Q, Lens, Mask, PO, PLSE, Sk, Sv,
        PKc, PKs, PKz, PKa, PKb, PKls, PKov, PKoi, PKop, PVc, PVs, PVz, PVa, PVb, PVls, PVov, PVoi, PVop,
        DKc, DKs, DKz, DKa, DKb, DKls, DKov, DKoi, DKop, DVc, DVs, DVz, DVa, DVb, DVls, DVov, DVoi, DVop,
        Bk, Bv, Nk, Nv,
        qk_scale, cap, Hkv, S, P_CAP, D_CAP, d_block, BUF_CAP, N_SINK, T_NEW,
        pk_group, pv_group, dk_group, dv_group, pk_k2, dk_k2,
        mask_sb, mask_sh, mask_sl, mask_len,
        G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, W: tl.constexpr, WP: tl.constexpr,
        PB: tl.constexpr, E: tl.constexpr, BITS: tl.constexpr, STORE_EXACT: tl.constexpr,
        K_CHANNEL: tl.constexpr, V_CHANNEL: tl.constexpr, K_GROUP: tl.constexpr,
        P_R: tl.constexpr, D_R: tl.constexpr, RP: tl.constexpr, P_K_FOLD: tl.constexpr,
        D_K_ROW_TILE: tl.constexpr, V_GROUPS: tl.constexpr, K_GROUPS: tl.constexpr, P_K_OUT: tl.constexpr,
        D_K_OUT: tl.constexpr,
        CB: tl.constexpr, P_KRPT: tl.constexpr, D_KC: tl.constexpr,
        VK2: tl.constexpr, OUT_UNIT: tl.constexpr, MAGIC: tl.constexpr, FP32_DOT: tl.constexpr,
        SOFTCAP: tl.constexpr, MASK_KIND: tl.constexpr, SBT: tl.constexpr, DBT: tl.constexpr,
        D_TPB: tl.constexpr, XBT: tl.constexpr, NBT: tl.constexpr, BT: tl.constexpr,
        STAGES: tl.constexpr):
    """Program (b * Hkv + kv head, s): the s-th of S ranges of the work list
    (sinks, prefill, decode, buffer, new token), as a partial output."""
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // Hkv
    kvh = pid_bh % Hkv
    head = pid_bh.to(tl.int64)
    n_pre = tl.load(Lens).to(tl.int32)
    n_dec = tl.load(Lens + 1).to(tl.int32)
    n_buf = tl.load(Lens + 2).to(tl.int32)

    # the work list: each segment's live tiles, in key order
    items_s = tl.cdiv(N_SINK, SBT)
    p_tile0 = N_SINK // BT                  # the sinks shadow the prefill block's first tokens
    items_p = tl.maximum(tl.cdiv(n_pre, BT) - p_tile0, 0)
    if STORE_EXACT:
        items_d = tl.cdiv(n_dec, DBT)
    else:
        items_d = tl.cdiv(n_dec, d_block) * D_TPB
    items_b = tl.cdiv(n_buf, XBT)
    items_n = tl.cdiv(T_NEW, NBT)
    total = items_s + items_p + items_d + items_b + items_n
    per = tl.cdiv(total, S)
    w0 = (split % S) * per
    w1 = tl.minimum(w0 + per, total)
    # key position -> mask column: the mask's last column is the newest key (a
    # longer mask starts earlier; a shorter one, a sliding window's, hides the keys before it)
    shift = mask_len - (n_pre + n_dec + n_buf + T_NEW)

    g = tl.arange(0, GP)
    ok_g = g < G
    qrow = (b * Hkv * G + kvh * G + g).to(tl.int64)     # q heads of this KV head
    Qg = Q + (b * Hkv * G + kvh * G).to(tl.int64) * D    # their first row
    if MASK_KIND > 2:   # one mask row for every head
        mrow = b * mask_sb
    else:
        mrow = b * mask_sb + (kvh * G + g) * mask_sh
    e = tl.arange(0, E)
    ch = (e // WP) * W + e % WP                           # extended axis -> channel
    ok_c = (e % WP < W) & (ch < D)
    # the scores in fp32 whatever the floats arrive as: Triton's launcher passes fp32, Inductor's
    # fp64, and torch's mutation analysis traces them as Python floats
    qk_scale = tl.cast(qk_scale, tl.float32)
    cap = tl.cast(cap, tl.float32)
    DT: tl.constexpr = Q.dtype.element_ty

    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, E], tl.float32)
    acc_z = tl.zeros([GP], tl.float32)    # V's zero points, folded out of acc (`decode_tiles`)

    p_row_tile: tl.constexpr = K_CHANNEL and K_GROUP % BT == 0
    if split < S:   # the s-th range, every tile but those whose K records overflow their window
        lo, hi = _segment_range(w0, w1, 0, items_s)
        if lo < hi:
            q = _query(Q, qrow, ch, ok_g, ok_c, qk_scale, D)
            m_i, l_i, acc, acc_z = exact_pass(
                m_i, l_i, acc, acc_z, q, Sk + head * N_SINK * D, Sv + head * N_SINK * D, lo, hi, 0, 0,
                N_SINK, shift, ch, ok_c, ok_g, cap, Mask, mrow, mask_sl, DT, D, SBT, 1, FP32_DOT, SOFTCAP,
                MASK_KIND)
        off = items_s
        lo, hi = _segment_range(w0, w1, off, items_p)
        if lo < hi:
            if STORE_EXACT:
                q = _query(Q, qrow, ch, ok_g, ok_c, qk_scale, D)
                m_i, l_i, acc, acc_z = exact_pass(
                    m_i, l_i, acc, acc_z, q, PKc + head * P_CAP * D, PVc + head * P_CAP * D, lo, hi, p_tile0,
                    N_SINK, n_pre, shift, ch, ok_c, ok_g, cap, Mask, mrow, mask_sl,
                    DT, D, BT, STAGES, FP32_DOT, SOFTCAP, MASK_KIND)
            else:
                q = _query(Q, qrow, ch, ok_g, ok_c, qk_scale, D)
                (pkc, pks, pkz, pka, pkb, pkls, pkov, pkoi, pkop,
                 pvc, pvs, pvz, pva, pvb, pvls, pvov, pvoi) = _segment_parts(
                    head, P_CAP, 1, PKc, PKs, PKz, PKa, PKb, PKls, PKov, PKoi, PKop,
                    PVc, PVs, PVz, PVa, PVb, PVls, PVov, PVoi,
                    pk_group, pv_group, pk_k2, D, W, K_CHANNEL, V_CHANNEL, P_R, VK2)
                m_i, l_i, acc, acc_z = compressed_pass(
                    m_i, l_i, acc, acc_z, q, Qg, qk_scale, lo, hi, p_tile0, N_SINK, n_pre, shift,
                    pkc, pks, pkz, pka, pkb, pkls, pkov, pkoi, pkop,
                    pvc, pvs, pvz, pva, pvb, pvls, pvov, pvoi,
                    P_CAP, pk_group, pv_group, pk_k2 * D, ch, ok_c, ok_g, cap, Mask, mrow, mask_sl,
                    DT, D, W, WP, PB, E, GP, BT, 1, True, BITS, K_CHANNEL, V_CHANNEL, P_K_FOLD,
                    p_row_tile, V_GROUPS, K_GROUPS, P_R, RP, P_K_OUT, CB, P_KRPT * BT, VK2,
                    OUT_UNIT, MAGIC, FP32_DOT, SOFTCAP, MASK_KIND, STAGES, False)
        off += items_p
        lo, hi = _segment_range(w0, w1, off, items_d)
        if lo < hi:
            if STORE_EXACT:
                q = _query(Q, qrow, ch, ok_g, ok_c, qk_scale, D)
                m_i, l_i, acc, acc_z = exact_pass(
                    m_i, l_i, acc, acc_z, q, DKc + head * D_CAP * D, DVc + head * D_CAP * D, lo, hi, 0, 0,
                    n_dec, n_pre + shift, ch, ok_c, ok_g, cap, Mask, mrow, mask_sl,
                    DT, D, DBT, STAGES, FP32_DOT, SOFTCAP, MASK_KIND)
            else:
                q = _query(Q, qrow, ch, ok_g, ok_c, qk_scale, D)
                (dkc, dks, dkz, dka, dkb, dkls, dkov, dkoi, dkop,
                 dvc, dvs, dvz, dva, dvb, dvls, dvov, dvoi) = _segment_parts(
                    head, D_CAP, D_CAP // d_block, DKc, DKs, DKz, DKa, DKb, DKls, DKov, DKoi, DKop,
                    DVc, DVs, DVz, DVa, DVb, DVls, DVov, DVoi,
                    dk_group, dv_group, dk_k2, D, W, K_CHANNEL, V_CHANNEL, D_R, VK2)
                m_i, l_i, acc, acc_z = compressed_pass(
                    m_i, l_i, acc, acc_z, q, Qg, qk_scale, lo, hi, 0, 0, n_dec, n_pre + shift,
                    dkc, dks, dkz, dka, dkb, dkls, dkov, dkoi, dkop,
                    dvc, dvs, dvz, dva, dvb, dvls, dvov, dvoi,
                    d_block, dk_group, dv_group, dk_k2 * D, ch, ok_c, ok_g, cap, Mask, mrow, mask_sl,
                    DT, D, W, WP, PB, E, GP, DBT, D_TPB, False, BITS, K_CHANNEL, V_CHANNEL, False,
                    D_K_ROW_TILE, V_GROUPS, K_GROUPS, D_R, RP, D_K_OUT, CB, D_KC, VK2,
                    OUT_UNIT, MAGIC, FP32_DOT, SOFTCAP, MASK_KIND, STAGES, False)
        off += items_d
        lo, hi = _segment_range(w0, w1, off, items_b)
        if lo < hi:
            q = _query(Q, qrow, ch, ok_g, ok_c, qk_scale, D)
            m_i, l_i, acc, acc_z = exact_pass(
                m_i, l_i, acc, acc_z, q, Bk + head * BUF_CAP * D, Bv + head * BUF_CAP * D, lo, hi, 0, 0,
                n_buf, n_pre + n_dec + shift, ch, ok_c, ok_g, cap, Mask, mrow, mask_sl,
                DT, D, XBT, 1, FP32_DOT, SOFTCAP, MASK_KIND)
        off += items_b
        lo, hi = _segment_range(w0, w1, off, items_n)
        if lo < hi:     # the call's new token, not yet in the store
            q = _query(Q, qrow, ch, ok_g, ok_c, qk_scale, D)
            m_i, l_i, acc, acc_z = exact_pass(
                m_i, l_i, acc, acc_z, q, Nk + head * T_NEW * D, Nv + head * T_NEW * D, lo, hi, 0, 0, T_NEW,
                n_pre + n_dec + n_buf + shift, ch, ok_c, ok_g, cap, Mask, mrow, mask_sl,
                DT, D, NBT, 1, FP32_DOT, SOFTCAP, MASK_KIND)
    else:           # program S + s: the tiles of the s-th range that the program s skipped
        if P_K_OUT:
            lo, hi = _segment_range(w0, w1, items_s, items_p)
            if lo < hi:
                q = _query(Q, qrow, ch, ok_g, ok_c, qk_scale, D)
                (pkc, pks, pkz, pka, pkb, pkls, pkov, pkoi, pkop,
                 pvc, pvs, pvz, pva, pvb, pvls, pvov, pvoi) = _segment_parts(
                    head, P_CAP, 1, PKc, PKs, PKz, PKa, PKb, PKls, PKov, PKoi, PKop,
                    PVc, PVs, PVz, PVa, PVb, PVls, PVov, PVoi,
                    pk_group, pv_group, pk_k2, D, W, K_CHANNEL, V_CHANNEL, P_R, VK2)
                m_i, l_i, acc, acc_z = compressed_pass(
                    m_i, l_i, acc, acc_z, q, Qg, qk_scale, lo, hi, p_tile0, N_SINK, n_pre, shift,
                    pkc, pks, pkz, pka, pkb, pkls, pkov, pkoi, pkop,
                    pvc, pvs, pvz, pva, pvb, pvls, pvov, pvoi,
                    P_CAP, pk_group, pv_group, pk_k2 * D, ch, ok_c, ok_g, cap, Mask, mrow, mask_sl,
                    DT, D, W, WP, PB, E, GP, BT, 1, True, BITS, K_CHANNEL, V_CHANNEL, P_K_FOLD,
                    p_row_tile, V_GROUPS, K_GROUPS, P_R, RP, P_K_OUT, CB, P_KRPT * BT, VK2,
                    OUT_UNIT, MAGIC, FP32_DOT, SOFTCAP, MASK_KIND, STAGES, True)
        if D_K_OUT and D_TPB > 1:   # (a tile that is its whole block holds its records: no overflow)
            lo, hi = _segment_range(w0, w1, items_s + items_p, items_d)
            if lo < hi:
                q = _query(Q, qrow, ch, ok_g, ok_c, qk_scale, D)
                (dkc, dks, dkz, dka, dkb, dkls, dkov, dkoi, dkop,
                 dvc, dvs, dvz, dva, dvb, dvls, dvov, dvoi) = _segment_parts(
                    head, D_CAP, D_CAP // d_block, DKc, DKs, DKz, DKa, DKb, DKls, DKov, DKoi, DKop,
                    DVc, DVs, DVz, DVa, DVb, DVls, DVov, DVoi,
                    dk_group, dv_group, dk_k2, D, W, K_CHANNEL, V_CHANNEL, D_R, VK2)
                m_i, l_i, acc, acc_z = compressed_pass(
                    m_i, l_i, acc, acc_z, q, Qg, qk_scale, lo, hi, 0, 0, n_dec, n_pre + shift,
                    dkc, dks, dkz, dka, dkb, dkls, dkov, dkoi, dkop,
                    dvc, dvs, dvz, dva, dvb, dvls, dvov, dvoi,
                    d_block, dk_group, dv_group, dk_k2 * D, ch, ok_c, ok_g, cap, Mask, mrow, mask_sl,
                    DT, D, W, WP, PB, E, GP, DBT, D_TPB, False, BITS, K_CHANNEL, V_CHANNEL, False,
                    D_K_ROW_TILE, V_GROUPS, K_GROUPS, D_R, RP, D_K_OUT, CB, D_KC, VK2,
                    OUT_UNIT, MAGIC, FP32_DOT, SOFTCAP, MASK_KIND, STAGES, True)

    has = l_i > 0
    o = (acc + acc_z[:, None]) / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    n_slots = S
    if P_K_OUT or (D_K_OUT and D_TPB > 1):   # programs S.. 2S - 1: the overflowing tiles
        n_slots = 2 * S
    slot = qrow * n_slots + split
    tl.store(PO + slot[:, None] * D + ch[None, :], o, mask=ok_g[:, None] & ok_c[None, :])
    tl.store(PLSE + slot, lse, mask=ok_g)


@triton.jit
def _combine_kernel(PO, PLSE, Out, SinkLogits, S_TOTAL, Hq, D: tl.constexpr, DP: tl.constexpr,
                    SC: tl.constexpr, SINK_LOGITS: tl.constexpr):
    """Merge the S_TOTAL partials of one (batch, q head) by their log-sum-exp;
    with SINK_LOGITS, the head's sink logit (natural base) starts the denominator."""
    row = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, DP)
    ok_d = d < D
    if SINK_LOGITS:
        m = tl.load(SinkLogits + row % Hq).to(tl.float32) * LOG2E    # to base 2
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



COMBINE_CHUNK = 64     # partials the combine kernel merges per iteration (registers: SC x DP)
# what changes the best tile config: head dim, bits, method (stats axes and
# groups, ranks, outliers), query dtype, GQA ratio
AUTOTUNE_KEY = ("D", "BITS", "G", "STORE_EXACT", "K_CHANNEL", "V_CHANNEL", "K_GROUP", "P_R", "D_R",
                "P_K_OUT", "VK2", "V_GROUPS", "K_GROUPS", "MAGIC", "FP32_DOT")


@functools.lru_cache(maxsize=32)
def _autotuned_kernel(configs: tuple[TileConfig, ...]):
    """`_attention_kernel` autotuned over `configs` (pruned on the host by
    `decode_plan.prune_tile_configs`, so the autotuner needs no pruning hook
    of its own, which torch's wrap_triton would have to support)."""
    return triton.autotune(
        configs=[triton.Config({"BT": c.tile, "STAGES": c.stages}, num_warps=c.warps, num_stages=c.stages)
                 for c in configs],
        key=list(AUTOTUNE_KEY))(_attention_kernel)


@functools.lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4   # interpreter: few programs run fastest


_PARTS = KERNEL_PARTS          # the parts the kernel reads per segment, in the one order store.py declares


def _pointers(seg, q: torch.Tensor) -> list[torch.Tensor]:
    """A segment's part tensors in `_PARTS` order (q stands in for absent parts)."""
    return [(t if (t := getattr(seg, name)) is not None else q).contiguous() for name in _PARTS]


def _mask_args(attn_mask: torch.Tensor | None, q: torch.Tensor, B: int, Hq: int):
    """(mask tensor, kind, strides (b, h, l), length). Kind 0: none; 1 bool /
    2 additive, a row per query head; 3 bool / 4 additive, one row for all
    heads (the mask's head stride is 0: Hugging Face's [B, 1, 1, L]), which
    the kernel loads as one [BT] vector a tile, not [GP, BT]: the tile's
    scores then stay in the tensor-core layout (sm_90a, KIVI-2 d 128,
    64-token tile, 4 warps: 1,210 -> the figure in results/kernel_sass_sm90.md)."""
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
    if m.stride(1) == 0:
        kind += 2
    return m, kind, (m.stride(0), m.stride(1), m.stride(3)), mlen


def decode_attention_launch(q: torch.Tensor, k_parts: list[torch.Tensor],
                            v_parts: list[torch.Tensor], k_new: torch.Tensor | None,
                            v_new: torch.Tensor | None, attn_mask: torch.Tensor | None,
                            scale: float, config: str, wrap=None,
                            num_splits: int | None = None, softcap: float = 0.0,
                            sink_logits: torch.Tensor | None = None,
                            tile_config: TileConfig | None = None,
                            sm_count: int | None = None) -> torch.Tensor:
    """Run the kernels (eagerly, or through `wrap` = torch.library.wrap_triton
    inside the triton_op). q [B, Hq, 1, D]; k_parts / v_parts in
    `StoreLayout.names` order; k_new / v_new [B, Hkv, T, D] (or None): the
    call's new tokens, attended after the store; attn_mask None, bool (True =
    keep) or additive, broadcastable to [B, Hq, 1, L_mask], its last column
    the newest key (keys before its first column are hidden: a sliding
    window). `num_splits`: programs per (batch, KV head) (default:
    `decode_plan.num_splits`); `tile_config`: a fixed config instead of the
    autotuner's choice (the interpreter always runs a fixed one); `sm_count`:
    the SMs that split rule fills (default: q's device's; the no-GPU
    kernel model passes its device model's)."""
    cfg = CodecConfig.from_json(config)
    ks, vs = KVStore(cfg, "k", k_parts), KVStore(cfg, "v", v_parts)
    B, Hq, T, D = q.shape
    if T != 1:
        raise ValueError(f"gear decode attention: one query token per sequence, got {T}.")
    Hkv = ks.buffer.shape[1]
    if Hq % Hkv:
        raise ValueError(f"gear decode attention: {Hq} query heads for {Hkv} KV heads.")
    if sink_logits is not None and sink_logits.numel() != Hq:
        raise ValueError(f"gear decode attention: sink_logits must hold one logit per query head ({Hq}), "
                         f"got {sink_logits.numel()}.")
    launch = wrap if wrap is not None else (lambda kernel: kernel)
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    q_layout, q = q, q.contiguous()
    mask, mask_kind, ms, mask_len = _mask_args(attn_mask, q, B, Hq)
    t_new = 0 if k_new is None else k_new.shape[2]
    plan = decode_plan.plan(ks.layout, vs.layout, q_dtype=q.dtype, heads=Hq, kv_heads=Hkv,
                            prefill_tokens=ks.prefill.codes.shape[2], decode_tokens=ks.decode.codes.shape[2],
                            sink_tokens=ks.sink.shape[2], buffer_tokens=ks.buffer.shape[2], new_tokens=t_new,
                            mask_kind=mask_kind, softcap=softcap, interpret=interpret)
    splits = num_splits or decode_plan.num_splits(B * Hkv, plan.tiles, sm_count or _sm_count(q.device))
    # with K outlier records, programs S + s read the tiles of range s whose records overflow
    # their window (the kernel's `split < S` branches), as partials of their own
    programs = splits * (2 if decode_plan.overflow_programs(plan.consts) else 1)
    po = torch.empty(B, Hq, programs, D, dtype=torch.float32, device=q.device)
    plse = torch.empty(B, Hq, programs, dtype=torch.float32, device=q.device)
    tensors = [q, ks.lengths.to(q.device), mask, po, plse, ks.sink.contiguous(), vs.sink.contiguous(),
               *_pointers(ks.prefill, q), *_pointers(vs.prefill, q), *_pointers(ks.decode, q),
               *_pointers(vs.decode, q), ks.buffer.contiguous(), vs.buffer.contiguous(),
               q if k_new is None else k_new.contiguous(), q if v_new is None else v_new.contiguous()]
    if tile_config is None and not interpret:
        c = plan.consts
        configs = decode_plan.prune_tile_configs(TILE_CONFIGS, c["E"], D, c["BITS"] or 16,
                                                 max(c["P_R"], c["D_R"]), decode_plan.has_outliers(c))
        kernel, tiling = _autotuned_kernel(tuple(configs)), {}
    else:
        c = tile_config or DEFAULT_TILE_CONFIG
        tiles = sorted({t.tile for t in TILE_CONFIGS})
        if c.tile not in tiles:         # e.g. 16: GEAR-2's K records read 2.5e-2 off the reference there
            raise ValueError(f"gear decode attention: tile_config.tile must be one of {tiles} (the "
                             f"kernel's tested tiles), got {c.tile}.")
        kernel, tiling = _attention_kernel, dict(BT=c.tile, STAGES=c.stages, num_warps=c.warps,
                                                 num_stages=c.stages)
    launch(kernel)[(B * Hkv, programs)](
        *tensors, scale * _LOG2E, softcap * _LOG2E, Hkv, splits, **plan.scalars,
        mask_sb=ms[0], mask_sh=ms[1], mask_sl=ms[2], mask_len=mask_len, **plan.consts, **tiling)

    out = torch.empty_like(q)
    launch(_combine_kernel)[(B * Hq,)](po, plse, out, q if sink_logits is None else sink_logits.contiguous(),
                                       programs, Hq, D=D, DP=pow2(D),
                                       SC=min(COMBINE_CHUNK, max(16, pow2(programs))),
                                       SINK_LOGITS=sink_logits is not None)
    return out if q_layout.is_contiguous() else torch.empty_like(q_layout).copy_(out)


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
    representative: bool = False   # the one of its kind the default checks build


BUILD_METHODS = (("none", 16), ("kcvt", 4), ("kcvt", 8), ("kivi", 2), ("kivi", 4), ("per_token", 4),
                 ("gear", 2), ("gear", 4), ("gear_l", 4))
_TRITON_TYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
                torch.uint8: "u8", torch.int8: "i8", torch.int16: "i16", torch.int32: "i32",
                torch.int64: "i64"}


def sm90_build_specs(head_dims=(64, 128), context: int = 32768, gqa: int = 4) -> list[BuildSpec]:
    """Every configuration the launcher produces for representative shapes:
    each method / bits of BUILD_METHODS at each head dim, a `context`-token
    prefill block, 4 exact sinks, 4 decode blocks, `gqa` query heads per KV
    head: fp16 queries with a bool mask (one row for all heads, Hugging
    Face's) under every tile config the
    autotuner keeps, and at the representative one of those
    (`decode_plan.representative`: the default where kept) bf16 (additive
    mask, a row per head, softcap) and fp32 (no mask); then the combine kernel with and
    without sink logits. Built
    from the same layouts, `decode_plan.plan` and pruning as the launcher."""
    from ..config import GearConfig
    from ..store import StoreLayout
    specs = []
    for D in head_dims:
        for method, bits in BUILD_METHODS:
            cfg = GearConfig(method=method, bits=bits if method != "none" else 4)
            for qdt, mask_kind, softcap in ((torch.float16, 3, 0.0), (torch.bfloat16, 2, 30.0),
                                            (torch.float32, 0, 0.0)):
                kl, vl = (StoreLayout.build(cfg, kind, D, qdt, context, 4) for kind in "kv")
                plan = decode_plan.plan(kl, vl, q_dtype=qdt, heads=gqa * 8, kv_heads=8,
                                        prefill_tokens=context, decode_tokens=4 * kl.decode.block,
                                        sink_tokens=4, buffer_tokens=kl.decode.block, new_tokens=1,
                                        mask_kind=mask_kind, softcap=softcap, interpret=False)
                c = plan.consts
                kept = decode_plan.prune_tile_configs(TILE_CONFIGS, c["E"], D, c["BITS"] or 16,
                                                      max(c["P_R"], c["D_R"]), decode_plan.has_outliers(c))
                rep = decode_plan.representative(kept)
                configs = kept if qdt == torch.float16 else [rep]
                sig = _signature(kl, vl, qdt, mask_kind, c)
                for t in configs:
                    name = (f"attention-{method}{bits}-d{D}-{_TRITON_TYPE[qdt]}"
                            f"-bt{t.tile}w{t.warps}s{t.stages}")
                    specs.append(BuildSpec(name, _attention_kernel, sig, dict(c, BT=t.tile, STAGES=t.stages),
                                           t.warps, t.stages, representative=t == rep))
    for sink_logits in (False, True):
        for D in head_dims:
            consts = dict(D=D, DP=pow2(D), SC=COMBINE_CHUNK, SINK_LOGITS=sink_logits)
            sig = {n: "constexpr" if n in consts else "i32" for n in _combine_kernel.arg_names}
            sig.update(PO="*fp32", PLSE="*fp32", Out="*fp16", SinkLogits="*fp16")
            specs.append(BuildSpec(f"combine-d{D}-sink_logits{int(sink_logits)}", _combine_kernel, sig, consts, 4, 1))
    return specs


def _signature(kl, vl, qdt: torch.dtype, mask_kind: int, consts: dict) -> dict:
    """`_attention_kernel`'s argument types for stores of layouts kl / vl."""
    q = "*" + _TRITON_TYPE[qdt]
    held = "*" + _TRITON_TYPE[kl.dtype]
    sig = dict(Q=q, Lens="*i64", Mask={0: q, 1: "*u8", 2: q, 3: "*u8", 4: q}[mask_kind], PO="*fp32",
               PLSE="*fp32",
               Sk=held, Sv=held, Bk=held, Bv=held, Nk=held, Nv=held, qk_scale="fp32", cap="fp32")
    for prefix, layout in (("PK", kl.prefill), ("PV", vl.prefill), ("DK", kl.decode), ("DV", vl.decode)):
        dtypes = {p.name: p.dtype for p in layout.parts}
        for arg, part in zip(("c", "s", "z", "a", "b", "ls", "ov", "oi", "op"), _PARTS):
            sig[prefix + arg] = "*" + _TRITON_TYPE[dtypes[part]] if part in dtypes else q
    names = _attention_kernel.arg_names
    return {n: "constexpr" if n in consts or n in ("BT", "STAGES") else sig.get(n, "i32") for n in names}


@torch.library.triton_op("gear::attention_triton", mutates_args=())
def attention_triton(q: torch.Tensor, k_parts: list[torch.Tensor], v_parts: list[torch.Tensor],
                     k_new: torch.Tensor | None, v_new: torch.Tensor | None,
                     attn_mask: torch.Tensor | None, scale: float, is_causal: bool,
                     config: str, softcap: float = 0.0,
                     sink_logits: torch.Tensor | None = None) -> torch.Tensor:
    """gear::attention_triton: the launcher with its kernels wrapped, so
    Inductor sees (and emits) them in its output code. One query token: a
    single row needs no causal mask, so is_causal has no effect."""
    return decode_attention_launch(q, k_parts, v_parts, k_new, v_new, attn_mask, scale, config,
                                   wrap=torch.library.wrap_triton, softcap=softcap,
                                   sink_logits=sink_logits)
