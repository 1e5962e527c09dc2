"""Paged flash-decoding in Triton: decode rows attending over a `PagedPool`'s
compressed pages, read in place through the block table (issue 31, item 2).

Job: the decode rows of a continuous-batching step (one new token each,
pasts of any length), each row's queries q [R, Hq, D] against, in position
order, its exact sinks (pool.sink), its compressed pages (page ids
`page_ids[page_ptr[r] .. page_ptr[r + 1])`, page p of layer l at batch row
p * layers + l of every slab part, the decode `SegmentLayout` of
`pool.layouts[kind]`; the first page's first s places are shadowed by the
sinks), its exact tail (pool.tail) and its new token (k_new / v_new). The
torch reference is `paged_attention.attend`; `paged_attention.attend_triton`
calls this on CUDA.

Algorithm (split-K flash-decoding, one launch plus one combine):
* Grid (R * Hkv, S) (2S with K outlier records, as `decode_attention`):
  program (row, KV head, s) reads pages [s * per, (s + 1) * per) of the
  row's block table, each page a compressed decode segment read by
  `decode_tiles.compressed_pass` (the store kernel's tile loop: codes
  dequantized in registers, low-rank and outlier terms fused) with the
  segment's part pointers moved to that page's (slab row, head)
  (`decode_attention._segment_parts`), so no page is gathered or
  dequantized to memory. Program s = 0 also reads the exact sinks, tail and
  new token (`decode_tiles.exact_pass`). `per` is a runtime int (the rows'
  longest block table over S), so the compiled kernel serves every step.
* The G = Hq / Hkv query heads of a KV head are the rows of one [GP, E]
  query tile: each page tile is read once for all of them.
* With K outlier records split over several tiles a block (GEAR), programs
  S + s read the tiles of program s's pages whose records overflow their
  window (`decode_tiles`' OVERFLOW pass), as partials of their own.
* Each program writes its normalised partial and log-sum-exp; the store
  kernel's `_combine_kernel` merges a row's partials.
* Page tile (`_page_tile`): the store kernel's decode tile, halved to keep
  a thread's dequantized values within `decode_plan`'s pruning bound at 8
  warps. sm_90a (fp16 / bf16, d 64 and 128, GQA 4): no spill but GEAR-2 at
  d 128 (a 32-byte stack, two local loads a page, none in a tile loop);
  the tile loop issues cp.async (tests/test_paged_triton.py builds them).
Everything the store kernel supports in a decode segment is read: exact
("none"), KIVI / KCVT / per-token at 2/4/8 bits, GEAR's low rank and K/V
outliers. A prefill chunk with a past runs as one row per token (token t
attends the row's past and the chunk's tokens [0, t], `new_len`), in the
same launch as the decode rows: each of its tokens reads the pages again
(GQA rows only share a tile; a chunk-wide query tile is not done).
Not yet: autotuned tiles / warps, CUDA graphs (the grid's split count
follows the step's longest row), a prefill chunk's tokens sharing page
tiles.
Neighbours: `decode_tiles` (tile loops), `decode_plan` (constexprs),
`decode_attention` (segment pointers, combine), `paged` (the pool).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ..store import KERNEL_PARTS, StoreLayout
from . import decode_plan
from .decode_attention import _combine_kernel, _segment_parts, COMBINE_CHUNK
from .decode_plan import pow2
from .decode_tiles import compressed_pass, exact_pass

_LOG2E = 1.4426950408889634
WARPS, STAGES = 8, 3    # fixed (no autotuning yet): the store kernel's default warps and stages


@triton.jit
def _query(Q, qrow, ch, ok_g, ok_c, qk_scale, D: tl.constexpr):
    """This KV head's query rows [GP, E], fp32, times qk_scale (on the
    extended channel axis of `decode_tiles`)."""
    return tl.load(Q + qrow[:, None] * D + ch[None, :], mask=ok_g[:, None] & ok_c[None, :],
                   other=0.0).to(tl.float32) * qk_scale


@triton.jit
def _pages(m_i, l_i, acc, acc_z, q, Qg, qk_scale, lo_p, hi_p, p0, PageIds, use_sinks, n_sink, layer, layers,
           Hkv, kvh, page_tokens, Kc, Ks, Kz, Ka, Kb, Kls, Kov, Koi, Kop, Vc, Vs, Vz, Va, Vb, Vls, Vov, Voi,
           d_block, dk_group, dv_group, dk_k2, ch, ok_c, ok_g, cap, Q, mrow,
           DT: tl.constexpr, D: tl.constexpr, W: tl.constexpr, WP: tl.constexpr, PB: tl.constexpr,
           E: tl.constexpr, GP: tl.constexpr, BITS: tl.constexpr, STORE_EXACT: tl.constexpr,
           K_CHANNEL: tl.constexpr, V_CHANNEL: tl.constexpr, D_R: tl.constexpr, RP: tl.constexpr,
           D_K_ROW_TILE: tl.constexpr, V_GROUPS: tl.constexpr, K_GROUPS: tl.constexpr, D_K_OUT: tl.constexpr,
           CB: tl.constexpr,
           D_KC: tl.constexpr, VK2: tl.constexpr, OUT_UNIT: tl.constexpr, MAGIC: tl.constexpr,
           FP32_DOT: tl.constexpr, DBT: tl.constexpr, D_TPB: tl.constexpr, STAGES: tl.constexpr,
           OVERFLOW: tl.constexpr):
    """Pages [lo_p, hi_p) of a row's block table (from p0 in PageIds), each a
    compressed decode segment at slab row page * layers + layer, head kvh,
    folded into the online-softmax state (OVERFLOW: only the tiles whose K
    records overflow their window, `decode_tiles`). The first page's first
    n_sink places are the sinks' (read exact elsewhere)."""
    items = (page_tokens // d_block) * D_TPB       # tiles of a page
    for j in range(lo_p, hi_p):
        page = tl.load(PageIds + p0 + j)
        seg = (page * layers + layer) * Hkv + kvh      # (slab row, head): int64
        t_first = tl.where((j == 0) & use_sinks, n_sink, 0)
        if STORE_EXACT:
            if not OVERFLOW:
                m_i, l_i, acc, acc_z = exact_pass(
                    m_i, l_i, acc, acc_z, q, Kc + seg * page_tokens * D, Vc + seg * page_tokens * D,
                    0, tl.cdiv(page_tokens, DBT), 0, t_first, page_tokens, 0, ch, ok_c, ok_g, cap, Q, mrow,
                    0, DT, D, DBT, STAGES, FP32_DOT, False, 0)
        else:
            (kc, ks, kz, ka, kb, kls, kov, koi, kop,
             vc, vs, vz, va, vb, vls, vov, voi) = _segment_parts(
                seg, page_tokens, page_tokens // d_block, Kc, Ks, Kz, Ka, Kb, Kls, Kov, Koi, Kop,
                Vc, Vs, Vz, Va, Vb, Vls, Vov, Voi, dk_group, dv_group, dk_k2, D, W, K_CHANNEL, V_CHANNEL,
                D_R, VK2)
            m_i, l_i, acc, acc_z = compressed_pass(
                m_i, l_i, acc, acc_z, q, Qg, qk_scale, 0, items, 0, t_first, page_tokens, 0,
                kc, ks, kz, ka, kb, kls, kov, koi, kop, vc, vs, vz, va, vb, vls, vov, voi,
                d_block, dk_group, dv_group, dk_k2 * D, ch, ok_c, ok_g, cap, Q, mrow, 0,
                DT, D, W, WP, PB, E, GP, DBT, D_TPB, False, BITS, K_CHANNEL, V_CHANNEL, False,
                D_K_ROW_TILE, V_GROUPS, K_GROUPS, D_R, RP, D_K_OUT, CB, D_KC, VK2,
                OUT_UNIT, MAGIC, FP32_DOT, False, 0, STAGES, OVERFLOW)
    return m_i, l_i, acc, acc_z


@triton.jit
def _paged_kernel(
        Q, PO, PLSE, PagePtr, PageIds, RowInfo, NewLen, Tail, Sink, Kn, Vn,
        Kc, Ks, Kz, Ka, Kb, Kls, Kov, Koi, Kop, Vc, Vs, Vz, Va, Vb, Vls, Vov, Voi, Vop,
        qk_scale, Hkv, S, per, layer, layers, page_tokens, n_sink, sum_t,
        d_block, dk_group, dv_group, dk_k2,
        G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, W: tl.constexpr, WP: tl.constexpr,
        PB: tl.constexpr, E: tl.constexpr, BITS: tl.constexpr, STORE_EXACT: tl.constexpr,
        K_CHANNEL: tl.constexpr, V_CHANNEL: tl.constexpr, D_R: tl.constexpr, RP: tl.constexpr,
        D_K_ROW_TILE: tl.constexpr, V_GROUPS: tl.constexpr, K_GROUPS: tl.constexpr, D_K_OUT: tl.constexpr,
        CB: tl.constexpr,
        D_KC: tl.constexpr, VK2: tl.constexpr, OUT_UNIT: tl.constexpr, MAGIC: tl.constexpr,
        FP32_DOT: tl.constexpr, DBT: tl.constexpr, D_TPB: tl.constexpr, SBT: tl.constexpr,
        XBT: tl.constexpr, OVER: tl.constexpr, STAGES: tl.constexpr):
    """Program (row * Hkv + KV head, s): pages [s * per, (s + 1) * per) of
    the row (s < S), and for s = 0 its sinks, tail and new token; s >= S
    (OVER): the overflowing K-record tiles of program s - S's pages."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    r = pid // Hkv
    kvh = pid % Hkv
    p0 = tl.load(PagePtr + r)
    n_pages = (tl.load(PagePtr + r + 1) - p0).to(tl.int32)
    slot = tl.load(RowInfo + r * 4)
    n_tail = tl.load(RowInfo + r * 4 + 1).to(tl.int32)
    sinks = tl.load(RowInfo + r * 4 + 2).to(tl.int32)
    start = tl.load(RowInfo + r * 4 + 3)
    n_new = tl.load(NewLen + r).to(tl.int32)
    use_sinks = (sinks != 0) & (n_sink > 0)
    s_idx = split % S
    lo_p = tl.minimum(s_idx * per, n_pages)
    hi_p = tl.minimum(lo_p + per, n_pages)

    Hq = Hkv * G
    g = tl.arange(0, GP)
    ok_g = g < G
    qrow = (r * Hq + kvh * G + g).to(tl.int64)
    Qg = Q + (r * Hq + kvh * G).to(tl.int64) * D
    e = tl.arange(0, E)
    ch = (e // WP) * W + e % WP
    ok_c = (e % WP < W) & (ch < D)
    qk_scale = tl.cast(qk_scale, tl.float32)
    cap = tl.zeros([], tl.float32)
    mrow = g * 0
    DT: tl.constexpr = Q.dtype.element_ty

    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, E], tl.float32)
    acc_z = tl.zeros([GP], tl.float32)
    q = _query(Q, qrow, ch, ok_g, ok_c, qk_scale, D)
    if split < S:
        m_i, l_i, acc, acc_z = _pages(
            m_i, l_i, acc, acc_z, q, Qg, qk_scale, lo_p, hi_p, p0, PageIds, use_sinks, n_sink, layer, layers,
            Hkv, kvh, page_tokens, Kc, Ks, Kz, Ka, Kb, Kls, Kov, Koi, Kop, Vc, Vs, Vz, Va, Vb, Vls, Vov, Voi,
            d_block, dk_group, dv_group, dk_k2, ch, ok_c, ok_g, cap, Q, mrow,
            DT, D, W, WP, PB, E, GP, BITS, STORE_EXACT, K_CHANNEL, V_CHANNEL, D_R, RP, D_K_ROW_TILE, V_GROUPS,
            K_GROUPS,
            D_K_OUT, CB, D_KC, VK2, OUT_UNIT, MAGIC, FP32_DOT, DBT, D_TPB, STAGES, False)
        if split == 0:
            # q loaded again (L2-resident): not live across the page loop's registers
            q = _query(Q, qrow, ch, ok_g, ok_c, qk_scale, D)
            H = Hkv
            base = ((slot * layers + layer) * 2) * H + kvh          # (slot, layer, K, head): int64
            if use_sinks:
                m_i, l_i, acc, acc_z = exact_pass(
                    m_i, l_i, acc, acc_z, q, Sink + base * n_sink * D, Sink + (base + H) * n_sink * D,
                    0, tl.cdiv(n_sink, SBT), 0, 0, n_sink, 0, ch, ok_c, ok_g, cap, Q, mrow, 0,
                    DT, D, SBT, 1, FP32_DOT, False, 0)
            m_i, l_i, acc, acc_z = exact_pass(
                m_i, l_i, acc, acc_z, q, Tail + base * page_tokens * D, Tail + (base + H) * page_tokens * D,
                0, tl.cdiv(n_tail, XBT), 0, 0, n_tail, 0, ch, ok_c, ok_g, cap, Q, mrow, 0,
                DT, D, XBT, 1, FP32_DOT, False, 0)
            new = (kvh * sum_t + start) * D      # its new tokens [start, start + n_new)
            m_i, l_i, acc, acc_z = exact_pass(
                m_i, l_i, acc, acc_z, q, Kn + new, Vn + new, 0, tl.cdiv(n_new, 16), 0, 0, n_new, 0, ch, ok_c,
                ok_g, cap, Q, mrow, 0, DT, D, 16, 1, FP32_DOT, False, 0)
    else:           # program S + s: the tiles of program s's pages whose K records overflow their window
        if OVER:
            m_i, l_i, acc, acc_z = _pages(
                m_i, l_i, acc, acc_z, q, Qg, qk_scale, lo_p, hi_p, p0, PageIds, use_sinks, n_sink, layer,
                layers, Hkv, kvh, page_tokens, Kc, Ks, Kz, Ka, Kb, Kls, Kov, Koi, Kop, Vc, Vs, Vz, Va, Vb, Vls,
                Vov, Voi, d_block, dk_group, dv_group, dk_k2, ch, ok_c, ok_g, cap, Q, mrow,
                DT, D, W, WP, PB, E, GP, BITS, STORE_EXACT, K_CHANNEL, V_CHANNEL, D_R, RP, D_K_ROW_TILE,
                V_GROUPS, K_GROUPS, D_K_OUT, CB, D_KC, VK2, OUT_UNIT, MAGIC, FP32_DOT, DBT, D_TPB, STAGES, True)

    has = l_i > 0
    o = (acc + acc_z[:, None]) / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    n_slots = tl.num_programs(1)
    at = qrow * n_slots + split
    tl.store(PO + at[:, None] * D + ch[None, :], o, mask=ok_g[:, None] & ok_c[None, :])
    tl.store(PLSE + at, lse, mask=ok_g)


def _plan(config, head_dim: int, dtype: torch.dtype, page_tokens: int, sink_tokens: int, q_dtype: torch.dtype,
          heads: int, kv_heads: int, interpret: bool):
    """The store kernel's constexprs and scalars for a pool's decode layouts
    (codec `config` resolved for head_dim, K/V of `dtype`, pages of
    `page_tokens`: a whole number of decode blocks), with the page tile
    (`_page_tile`)."""
    kl, vl = (StoreLayout.build(config, kind, head_dim, dtype, 0) for kind in "kv")
    plan = decode_plan.plan(kl, vl, q_dtype=q_dtype, heads=heads, kv_heads=kv_heads, prefill_tokens=0,
                            decode_tokens=page_tokens, sink_tokens=max(1, sink_tokens),
                            buffer_tokens=page_tokens, new_tokens=1, mask_kind=0, softcap=0.0,
                            interpret=interpret)
    _page_tile(plan.consts, kl.decode)
    return plan


def _page_tile(c: dict, dk) -> None:
    """The page tile DBT (in place, with what follows from it): the store
    kernel's decode tile (a whole block, up to 128 tokens), halved while a
    thread would hold more than `decode_plan`'s pruning bound of dequantized
    values (VALUES_PER_THREAD, OUTLIER_VALUES_PER_THREAD with outliers) at
    WARPS warps (sm_90a, GEAR-2 d 128, K records and V outliers: at a
    64-token tile its tile loop spilled 5 local loads / stores a trip; at 32
    none: of the 14 left, two are at the head of the page loop, once a
    page, the rest outside it)."""
    if c["STORE_EXACT"]:
        return
    most = decode_plan.VALUES_PER_THREAD[1]
    if decode_plan.has_outliers(c):
        most = decode_plan.OUTLIER_VALUES_PER_THREAD
    tile = c["DBT"]
    while tile > 16 and tile * c["E"] / (32 * WARPS) > most:
        tile //= 2
    if tile == c["DBT"]:
        return
    block = dk.block
    group = dk.token_group if dk.spec.axis == "channel" else dk.channel_group
    c["DBT"], c["D_TPB"] = tile, triton.cdiv(block, tile)
    c["D_KC"] = decode_plan.record_window(dk, tile)
    c["D_K_ROW_TILE"] = c["K_CHANNEL"] and (group == block or (group % tile == 0 and block % tile == 0))


CONSTS = ("G", "GP", "D", "W", "WP", "PB", "E", "BITS", "STORE_EXACT", "K_CHANNEL", "V_CHANNEL", "D_R", "RP",
          "D_K_ROW_TILE", "V_GROUPS", "K_GROUPS", "D_K_OUT", "CB", "D_KC", "VK2", "OUT_UNIT", "MAGIC", "FP32_DOT",
          "DBT",
          "D_TPB", "SBT", "XBT")


def kernel_consts(pool, q_dtype: torch.dtype, heads: int, interpret: bool) -> tuple[dict, dict]:
    """(constexprs, scalars) of `_paged_kernel` for this pool (OVER apart);
    kept on the pool per query dtype and heads (every layer of every step
    asks)."""
    cache = pool.__dict__.setdefault("_triton_consts", {})
    key = (q_dtype, heads, interpret)
    if key not in cache:
        cache[key] = _kernel_consts(pool, q_dtype, heads, interpret)
    return cache[key]


def _kernel_consts(pool, q_dtype: torch.dtype, heads: int, interpret: bool) -> tuple[dict, dict]:
    plan = _plan(pool.config, pool.head_dim, pool.dtype, pool.page_tokens, pool.sink_tokens, q_dtype, heads,
                 pool.heads, interpret)
    c = {k: plan.consts[k] for k in CONSTS}
    s = {k: plan.scalars[k] for k in ("d_block", "dk_group", "dv_group")}
    s["dk_k2"] = plan.scalars["dk_k2"]
    return c, s


def overflow(consts: dict) -> bool:
    """Whether the launch has overflow programs (K records, several tiles a block)."""
    return bool(consts["D_K_OUT"] and consts["D_TPB"] > 1)


@functools.lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def paged_decode(pool, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                 page_ptr: torch.Tensor, page_ids: torch.Tensor, row_info: torch.Tensor, max_pages: int,
                 scale: float, num_splits: int | None = None, new_len: torch.Tensor | None = None) -> torch.Tensor:
    """Rows' attention over the pool (module docstring): q [R, Hq, D] (one
    query token a row), k_new / v_new [Hkv, sum T, D] (the step's new K/V:
    row r attends new tokens [row_info[r, 3], + new_len[r]); new_len None:
    one each, a decode row), page_ptr [R + 1], page_ids, row_info [R, 4] =
    (slot, tail, sinks in use, start), new_len [R], on q's device (int64),
    max_pages the longest row's page count. Returns [R, Hq, D] in q's dtype.
    A prefill chunk's token t is a row of its own with new_len t + 1 (its
    causal mask)."""
    R, Hq, D = q.shape
    H = pool.heads
    if Hq % H:
        raise ValueError(f"gear paged decode: {Hq} query heads for {H} KV heads")
    if not 0 <= layer < pool.layers:
        raise ValueError(f"gear paged decode: layer {layer} of {pool.layers}")
    out = torch.empty(R, Hq, D, dtype=q.dtype, device=q.device)     # (q may be a strided view)
    if R == 0:
        return out
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    consts, scalars = kernel_consts(pool, q.dtype, Hq, interpret)
    tiles_per_page = pool.page_tokens // scalars["d_block"] * consts["D_TPB"]
    if num_splits is None:
        num_splits = decode_plan.num_splits(R * H, max(1, max_pages) * tiles_per_page, _sm_count(q.device))
    S = max(1, min(num_splits, max(1, max_pages)))
    per = max(1, -(-max_pages // S))
    programs = 2 * S if overflow(consts) else S
    q = q.contiguous()
    po = torch.empty(R, Hq, programs, D, dtype=torch.float32, device=q.device)
    plse = torch.empty(R, Hq, programs, dtype=torch.float32, device=q.device)
    parts = []
    for kind in "kv":
        slab = pool.slabs[kind]
        parts += [(t if (t := getattr(slab, name, None)) is not None else q) for name in KERNEL_PARTS]
    if new_len is None:
        new_len = torch.ones(R, dtype=torch.long, device=q.device)
    args = [q, po, plse, page_ptr, page_ids, row_info, new_len, pool.tail, pool.sink, k_new.contiguous(),
            v_new.contiguous(), *parts, scale * _LOG2E, H, S, per, layer, pool.layers, pool.page_tokens,
            pool.sink_tokens, k_new.shape[1], *scalars.values()]
    _paged_kernel[(R * H, programs)](*args, **consts, OVER=programs > S, STAGES=STAGES, num_warps=WARPS,
                                     num_stages=STAGES)
    _combine_kernel[(R * Hq,)](po, plse, out, q, programs, Hq, D=D, DP=pow2(D),
                               SC=min(COMBINE_CHUNK, max(16, pow2(programs))), SINK_LOGITS=False)
    return out


# ---- what the launcher can produce, for the no-GPU sm_90a build checks ----

BUILD_METHODS = (("none", 16), ("kivi", 2), ("kivi", 4), ("kcvt", 4), ("per_token", 4), ("gear", 2), ("gear", 4),
                 ("gear_l", 4))


def sm90_build_specs(head_dims=(128,), gqa: int = 4, q_dtypes=(torch.float16, torch.bfloat16)) -> list:
    """`_paged_kernel` as `paged_decode` launches it for a pool of each
    BUILD_METHODS codec (its default pages and sinks, 8 KV heads, `gqa`
    query heads each), for benchmarks/kernel_sass.py and the sm_90a checks
    (`decode_attention.BuildSpec`; the combine kernel is the store kernel's,
    built by its own specs)."""
    from ..config import CodecConfig, codec_of
    from .decode_attention import _TRITON_TYPE, BuildSpec
    specs = []
    for D in head_dims:
        for method, bits in BUILD_METHODS:
            config = codec_of(CodecConfig(method=method, bits=bits if method != "none" else 4)).for_head_dim(D)
            for qdt in q_dtypes:
                layouts = {k: StoreLayout.build(config, k, D, qdt, 0).decode for k in "kv"}
                block = layouts["k"].block
                page = block * -(-64 // block)
                sinks = min(config.sink_tokens, page - 1) if config.compresses else 0
                plan = _plan(config, D, qdt, page, sinks, qdt, gqa * 8, 8, False)
                c = {k: plan.consts[k] for k in CONSTS}
                q = "*" + _TRITON_TYPE[qdt]
                held = "*" + _TRITON_TYPE[config.held_dtype(qdt)]
                sig = dict(Q=q, PO="*fp32", PLSE="*fp32", PagePtr="*i64", PageIds="*i64", RowInfo="*i64", NewLen="*i64",
                           Tail=held, Sink=held, Kn=held, Vn=held, qk_scale="fp32")
                for prefix, kind in (("K", "k"), ("V", "v")):
                    dtypes = {p.name: p.dtype for p in layouts[kind].parts}
                    for arg, part in zip(("c", "s", "z", "a", "b", "ls", "ov", "oi", "op"), KERNEL_PARTS):
                        sig[prefix + arg] = "*" + _TRITON_TYPE[dtypes[part]] if part in dtypes else q
                consts = dict(c, OVER=overflow(c), STAGES=STAGES)
                signature = {n: "constexpr" if n in consts else sig.get(n, "i32") for n in _paged_kernel.arg_names}
                specs.append(BuildSpec(f"paged-{method}{bits}-d{D}-{_TRITON_TYPE[qdt]}", _paged_kernel, signature,
                                       consts, WARPS, STAGES, representative=True))
    return specs
