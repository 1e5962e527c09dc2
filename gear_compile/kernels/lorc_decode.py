"""LoRC's decode attention in Triton: K rebuilt from its latents tile by tile (issue 32).

Job: `gear::lorc_attention_cpu`'s op (kernels/cpu_lorc_attention.h: its
header comment is the specification) on a GPU, same signature, same
semantics: out = softmax(q K^T * scale + mask) V over one LoRC site's past,
where the past K and V are latent stores ([B, 1, L, r], one latent a token
shared by the layer's KV heads, under any codec the store kernel reads), the
first s tokens are LoRC's exact sinks (K before RoPE, V in head space), and
the call's new tokens come as K exact and already rotated, V as latents.
Neighbours: `lorc_launch` (the host side: plan, launcher, the ops),
`decode_tiles` (the codec's tile helpers: codes, stats, outlier units, the
products), `decode_attention` (the combine kernel the launcher runs after
this one), `passes.lorc` (decides and emits the op).

Algorithm (split-K flash decoding, one launch plus the store kernel's combine):

* Grid (B * Hkv * row blocks, S + 1). Program (b, KV head, s < S) takes the
  s-th of S equal ranges of the row's latent work list (the codec's exact
  sinks, the prefill block, the decode blocks, the buffer, the new tokens;
  tokens below s are shadowed by LoRC's sinks); program S reads LoRC's sinks.
  The sinks' V is in head space and every other V a latent, so each program
  holds one accumulator: [M, r_v] (latents) or [M, d] (the sinks'), never both.
* Rows: the G query heads of the KV head times the call's T tokens (GQA rows
  in tl.dot's M dimension, >= 16, at most `lorc_launch.MAX_ROWS` a program: more make row
  blocks, each reading the latents again).
* Per tile: the K latent codes are dequantized in registers
  (`decode_fields.codes_tile`, `stats`; GEAR's K records added as one-hot
  products, its low rank as A diag(s) B^T, both densely, since the latent is
  needed itself, not its scores), K = latents @ U_k^T (the KV head's rows,
  loaded on the store's extended channel axis) as a tl.dot, and RoPE fused
  on the tile: rot(K) is a second tl.dot with U_k^T's columns permuted and
  negated as rot permutes K's (rotate-half or interleaved, zero past the
  rotary dims), K * cos + rot(K) * sin with the tile's rows of the tables
  (per batch row: left padding keeps each row's positions). The scores, the
  mask / causal limit and the online softmax are `decode_tiles`'; V's
  latents (dequantized alike, with their per-token outliers) accumulate as
  latents.
* Each program normalises its partial and applies U_v^T once ([M, r_v] @
  [r_v, d], a tl.dot) before writing it, so its partial is d wide, not
  r_v + d, and `decode_attention._combine_kernel` merges the S + 1 partials
  of each query row by log-sum-exp, unchanged. (The C++ op applies U_v^T in
  its combine instead; on a GPU the per-program product is S small tl.dots
  against a wider partial's traffic and a second combine kernel.)

Refused (`lorc_launch.unsupported`, which `passes.lorc_fused.fused_reason`
reports): latents wider than 256 extended channels (rank > 256: the [tile,
r] latent tile would no longer fit the registers; such a site keeps the
replay path), a head dim above 256. Not yet: autotuned tiles / warps.
"""
import triton
import triton.language as tl

from .decode_attention import _segment_range
from .decode_fields import codes_tile, stats
from .decode_tiles import (RECORD_CHUNK, _factor, _finish_scores, _mma, _mma_acc, _softmax_step, _stats_at,
                           _with_v_outliers)


@triton.jit
def _store_parts(head, N, NBLK, c, s, z, a, b, ls, ov, oi, op, group, k2,
                 D: tl.constexpr, W: tl.constexpr, CHANNEL: tl.constexpr, R: tl.constexpr, KEYS: tl.constexpr):
    """One latent segment's part pointers moved to batch row `head` (parts
    [B, 1, ...], N token slots, NBLK blocks; `decode_attention._segment_parts`
    for one store of its own width)."""
    c += head * N * W
    if CHANNEL:
        s += head * (N // group) * D
        z += head * (N // group) * D
    else:
        s += head * N * (D // group)
        z += head * N * (D // group)
    if KEYS:            # K records: 2k * D per block, a pointer per 16 tokens plus one
        ov += head * NBLK * k2 * D
        oi += head * NBLK * k2 * D
        op += head * NBLK * (tl.cdiv(N // NBLK, 16) + 1)
    else:               # V: 2k channel indices per token
        ov += head * N * k2
        oi += head * N * k2
    if R > 0:
        a += head * N * R
        b += head * NBLK * D * R
        ls += head * NBLK * R
    return c, s, z, a, b, ls, ov, oi, op


@triton.jit
def _k_record_latents(x, Kov, Koi, Ks, r_lo, r_hi, tile_t0, tile_at, group, ch, D: tl.constexpr,
                      CB: tl.constexpr, BT: tl.constexpr, K_CHANNEL: tl.constexpr, K_ROW_TILE: tl.constexpr,
                      OUT_UNIT: tl.constexpr, DT: tl.constexpr, FP32_DOT: tl.constexpr):
    """x [BT, E] plus the K records [r_lo, r_hi) of the tile (first token
    tile_t0 in the segment, tile_at in its block): record (t, c, val) adds
    val * unit * s(t, c) at (t, c), as `decode_tiles._k_record_scores` adds
    it to the scores; here one-hot [BT, chunk] x [chunk, E] products put the
    chunk's records at their places, a RECORD_CHUNK a trip, so none is dropped."""
    for w0 in range(r_lo, r_hi, RECORD_CHUNK):
        r = w0 + tl.arange(0, RECORD_CHUNK)
        ok_r = r < r_hi
        val = tl.load(Kov + r, mask=ok_r, other=0).to(tl.float32)
        pos = tl.load(Koi + r, mask=ok_r, other=0).to(tl.int32) & ((1 << (CB + 8)) - 1)
        c = pos & ((1 << CB) - 1)
        t_in = ((pos >> CB) & 255) - tile_at % 256       # tiles never cross 256 tokens
        w = val * OUT_UNIT * _stats_at(Ks, tile_t0, tile_t0 + t_in, c, ok_r, group, D, K_CHANNEL, K_ROW_TILE)
        at_t = (tl.arange(0, BT)[:, None] == t_in[None, :]) & ok_r[None, :]
        at_c = (c[:, None] == ch[None, :]).to(tl.float32)
        x = _mma_acc(tl.where(at_t, w[None, :], 0.0), at_c, x, DT, FP32_DOT)
    return x


@triton.jit
def _latent_tile(Xc, Xs, Xz, Xa, Xb, Xls, Xov, Xoi, Xop, blk, tile_at, t, ok_t, block, group, k2d, ch, ok_c,
                 DT: tl.constexpr, D: tl.constexpr, W: tl.constexpr, WP: tl.constexpr, PB: tl.constexpr,
                 E: tl.constexpr, BT: tl.constexpr, BITS: tl.constexpr, EXACT: tl.constexpr,
                 CHANNEL: tl.constexpr, ROW_TILE: tl.constexpr, R: tl.constexpr, RP: tl.constexpr,
                 K_OUT: tl.constexpr, CB: tl.constexpr, VK2: tl.constexpr, OUT_UNIT: tl.constexpr,
                 MAGIC: tl.constexpr, FP32_DOT: tl.constexpr):
    """The latents [BT, E] of tokens t (extended channel axis of
    `decode_tiles`): exact rows as held, or the codes (plus V's outlier
    units) times scale plus zero, plus K's records and the low rank."""
    if EXACT:
        x = tl.load(Xc + t[:, None] * D + ch[None, :], mask=ok_t[:, None] & ok_c[None, :], other=0.0)
    else:
        c = codes_tile(Xc, t, ok_t, W, WP, PB, E, BT, BITS, MAGIC)
        if VK2 > 0:
            c = _with_v_outliers(c, Xov, Xoi, t, ok_t, ch, OUT_UNIT, VK2)
        sc, zc = stats(Xs, Xz, blk * block + tile_at, t, ok_t, ch, ok_c, group, D, CHANNEL, ROW_TILE, MAGIC)
        x = c * sc + zc
        if K_OUT or R > 0:
            x = x.to(tl.float32)
        if K_OUT:       # the tile's records: [ptr[tile_at / 16], ptr[(tile_at + BT) / 16]) of its block's
            ptrs = Xop + blk * (tl.cdiv(block, 16) + 1)
            r_lo = tl.load(ptrs + tile_at // 16)
            r_hi = tl.load(ptrs + tl.minimum((tile_at + BT) // 16, tl.cdiv(block, 16)))
            x = _k_record_latents(x, Xov + blk * k2d, Xoi + blk * k2d, Xs, r_lo, r_hi, blk * block + tile_at,
                                  tile_at, group, ch, D, CB, BT, CHANNEL, ROW_TILE, OUT_UNIT, DT, FP32_DOT)
        if R > 0:       # A diag(s) B^T of the tile's block
            r = tl.arange(0, RP)
            ok_r = r < R
            a = tl.load(Xa + t[:, None] * R + r[None, :], mask=ok_t[:, None] & ok_r[None, :], other=0)
            bk = tl.load(Xb + (blk * D + ch)[:, None] * R + r[None, :], mask=ok_c[:, None] & ok_r[None, :],
                         other=0)
            sr = tl.load(Xls + blk * R + r, mask=ok_r, other=0.0)
            x = _mma_acc(_factor(a, MAGIC), tl.trans(_factor(bk, MAGIC) * sr[None, :]), x, DT, FP32_DOT)
    return x


@triton.jit
def _rotate(k, kr, Cos, Sin, pos, ok_t, dd, rd):
    """k * cos + rot(k) * sin with the tables' rows at positions pos (cos 1
    and sin 0 past the rotary dims: those channels pass through)."""
    at = pos[:, None] * rd + dd[None, :]
    ok = ok_t[:, None] & (dd < rd)[None, :]
    return k * tl.load(Cos + at, mask=ok, other=1.0) + kr * tl.load(Sin + at, mask=ok, other=0.0)


@triton.jit
def _rot_source(dd, rd, ROPE: tl.constexpr):
    """(source channel, sign) of each channel dd of rot(k): rotate-half
    rot(k) = [-k2, k1] over the first rd channels; interleaved pairs
    rot(k)_2i = -k_2i+1, rot(k)_2i+1 = k_2i."""
    if ROPE == 1:
        src = tl.where(dd < rd // 2, dd + rd // 2, dd - rd // 2)
        sign = tl.where(dd < rd // 2, -1.0, 1.0)
    else:
        src = dd ^ 1
        sign = tl.where(dd % 2 == 0, -1.0, 1.0)
    return src, sign


@triton.jit
def _query(Q, qrow, dd, ok_m, qk_scale, D: tl.constexpr):
    """Query rows [M, len(dd)] at channels dd, fp32, times qk_scale: read
    where a product needs them (L1-resident), not held across the loops."""
    return tl.load(Q + qrow[:, None] * D + dd[None, :], mask=ok_m[:, None] & (dd < D)[None, :],
                   other=0.0).to(tl.float32) * qk_scale


@triton.jit
def _rebuilt_scores(lat, Q, qrow, ok_m, qk_scale, Uk, Cos, Sin, pos, ok_t, kch, ok_kc, rd, D: tl.constexpr,
                    DP: tl.constexpr, DC: tl.constexpr, MP: tl.constexpr, BT: tl.constexpr, DT: tl.constexpr,
                    ROPE: tl.constexpr, FP32_DOT: tl.constexpr):
    """q K^T [M, BT] for the tile's K rebuilt DC head channels at a time: K
    = latents [BT, KE] times this KV head's U_k^T columns (Uk [r, D], rows
    read on the latents' extended axis), rotated at `pos`, where rot(K) is
    the product with U's columns permuted and negated as rot permutes K's
    (`_rot_source`); the scores add up over the chunks, so no [BT, d] K
    or [r, d] U is ever held whole."""
    s = tl.zeros([MP, BT], tl.float32)
    for c0 in tl.static_range(0, DP, DC):
        dd = c0 + tl.arange(0, DC)
        ok_d = dd < D
        rows = kch[:, None] * D
        k = _mma(lat, tl.load(Uk + rows + dd[None, :], mask=ok_kc[:, None] & ok_d[None, :], other=0.0), DT,
                 FP32_DOT)
        if ROPE != 0:
            src, sign = _rot_source(dd, rd, ROPE)
            ur = tl.load(Uk + rows + src[None, :], mask=ok_kc[:, None] & (dd < rd)[None, :], other=0.0)
            k = _rotate(k, _mma(lat, ur * sign[None, :], DT, FP32_DOT), Cos, Sin, pos, ok_t, dd, rd)
        s = _mma_acc(_query(Q, qrow, dd, ok_m, qk_scale, D), tl.trans(k), s, DT, FP32_DOT)
    return s


@triton.jit
def _fold(m_i, l_i, acc, s, v, pos, ok_t, limit, shift, ok_m, Mask, mrow, mask_sl, DT: tl.constexpr,
          FP32_DOT: tl.constexpr, MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr):
    """The tile's scores s [M, BT] (key positions pos; row i sees keys <=
    limit[i] when CAUSAL) masked, one online-softmax step, and the tile's V
    rows [BT, *] accumulated."""
    if CAUSAL:
        s = tl.where(pos[None, :] <= limit[:, None], s, float("-inf"))
    s = _finish_scores(s, 0.0, Mask, mrow, pos + shift, ok_m, ok_t, mask_sl, False, MASK_KIND)
    p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i)
    return m_i, l_i, acc * alpha[:, None] + _mma(p, v, DT, FP32_DOT)


@triton.jit
def _latent_pass(m_i, l_i, acc, Q, qrow, qk_scale, lo, hi, tile0, t_first, n_valid, pos0, block,
                 Kc, Ks, Kz, Ka, Kb, Kls, Kov, Koi, Kop, Vc, Vs, Vz, Va, Vb, Vls, Vov, Voi, Vop,
                 k_group, v_group, k2d, Uk, Cos, Sin, rd, kch, ok_kc, vch, ok_vc,
                 limit, shift, ok_m, Mask, mrow, mask_sl,
                 DT: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, DC: tl.constexpr, MP: tl.constexpr,
                 KD: tl.constexpr, KW: tl.constexpr, KWP: tl.constexpr, KPB: tl.constexpr, KE: tl.constexpr,
                 VD: tl.constexpr, VW: tl.constexpr, VWP: tl.constexpr, VPB: tl.constexpr, VE: tl.constexpr, BITS: tl.constexpr, EXACT: tl.constexpr,
                 K_CHANNEL: tl.constexpr, V_CHANNEL: tl.constexpr, K_ROW_TILE: tl.constexpr, R: tl.constexpr,
                 RP: tl.constexpr, K_OUT: tl.constexpr, CB: tl.constexpr, VK2: tl.constexpr,
                 OUT_UNIT: tl.constexpr, MAGIC: tl.constexpr, FP32_DOT: tl.constexpr, MASK_KIND: tl.constexpr,
                 CAUSAL: tl.constexpr, ROPE: tl.constexpr, BT: tl.constexpr, TPB: tl.constexpr,
                 ONE_BLOCK: tl.constexpr, STAGES: tl.constexpr):
    """Tiles [lo, hi) of one latent segment (this row's parts): item i is
    tile (tile0 + i) % TPB of block (tile0 + i) // TPB (ONE_BLOCK: every
    tile in the one block of `block` tokens), its tokens in [t_first,
    n_valid) live; key position = pos0 + token."""
    for i in tl.range(lo, hi, num_stages=STAGES):
        # the tile's block and tokens, as decode_tiles._compressed_tile finds them: written out
        # again on purpose. A shared @triton.jit helper builds the same PTX, but the labels its
        # inlining leaves (line info) cost ptxas 3-9 more spill instructions at 255 registers
        # on sm_90a (lorc-gear4-r128: 31 -> 34, lorc-none16-r256: 43 -> 52)
        item = tile0 + i
        if ONE_BLOCK:
            blk = item * 0
            tile_at = item * BT
        else:
            blk = item // TPB
            tile_at = (item % TPB) * BT
        t_blk = tile_at + tl.arange(0, BT)
        t = blk * block + t_blk
        ok_t = (t_blk < block) & (t < n_valid) & (t >= t_first)
        lat = _latent_tile(Kc, Ks, Kz, Ka, Kb, Kls, Kov, Koi, Kop, blk, tile_at, t, ok_t, block, k_group, k2d,
                           kch, ok_kc, DT, KD, KW, KWP, KPB, KE, BT, BITS, EXACT, K_CHANNEL, K_ROW_TILE, R, RP,
                           K_OUT, CB, 0, OUT_UNIT, MAGIC, FP32_DOT)
        s = _rebuilt_scores(lat, Q, qrow, ok_m, qk_scale, Uk, Cos, Sin, pos0 + t, ok_t, kch, ok_kc, rd, D, DP, DC,
                            MP, BT, DT, ROPE, FP32_DOT)
        v = _latent_tile(Vc, Vs, Vz, Va, Vb, Vls, Vov, Voi, Vop, blk, tile_at, t, ok_t, block, v_group, 0,
                         vch, ok_vc, DT, VD, VW, VWP, VPB, VE, BT, BITS, EXACT, V_CHANNEL, False, R, RP,
                         False, CB, VK2, OUT_UNIT, MAGIC, FP32_DOT)
        m_i, l_i, acc = _fold(m_i, l_i, acc, s, v, pos0 + t, ok_t, limit, shift, ok_m, Mask, mrow, mask_sl, DT,
                              FP32_DOT, MASK_KIND, CAUSAL)
    return m_i, l_i, acc


@triton.jit
def _lorc_kernel(
        Q, Lens, Mask, PO, PLSE, Uk, Uv, Cos, Sin, LSk, LSv, Nk, Nv, SKc, SVc, BKc, BVc,
        PKc, PKs, PKz, PKa, PKb, PKls, PKov, PKoi, PKop, PVc, PVs, PVz, PVa, PVb, PVls, PVov, PVoi, PVop,
        DKc, DKs, DKz, DKa, DKb, DKls, DKov, DKoi, DKop, DVc, DVs, DVz, DVa, DVb, DVls, DVov, DVoi, DVop,
        qk_scale, Hkv, S, M, T, NRB, P_CAP, D_CAP, d_block, BUF_CAP, N_SINK, S_LORC, T_NEW, rd, cs_b,
        pk_group, pv_group, dk_group, dv_group, pk_k2, dk_k2, mask_sb, mask_sh, mask_st, mask_sl, mask_len,
        G: tl.constexpr, MP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, RK: tl.constexpr,
        RV: tl.constexpr, KD: tl.constexpr, KW: tl.constexpr, KWP: tl.constexpr, KPB: tl.constexpr,
        KE: tl.constexpr, VD: tl.constexpr, VW: tl.constexpr, VWP: tl.constexpr, VPB: tl.constexpr,
        VE: tl.constexpr, BITS: tl.constexpr, STORE_EXACT: tl.constexpr, K_CHANNEL: tl.constexpr,
        V_CHANNEL: tl.constexpr, K_GROUP: tl.constexpr, P_R: tl.constexpr, D_R: tl.constexpr, RP: tl.constexpr,
        D_K_ROW_TILE: tl.constexpr, P_K_OUT: tl.constexpr, D_K_OUT: tl.constexpr, CB: tl.constexpr,
        VK2: tl.constexpr, OUT_UNIT: tl.constexpr, MAGIC: tl.constexpr, FP32_DOT: tl.constexpr,
        MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, ROPE: tl.constexpr, SBT: tl.constexpr,
        LBT: tl.constexpr, BT: tl.constexpr, DBT: tl.constexpr, D_TPB: tl.constexpr, XBT: tl.constexpr,
        NBT: tl.constexpr, DC: tl.constexpr, STAGES: tl.constexpr):
    """Program (batch row, KV head, row block; s): for s < S the s-th range
    of the latent work list, for s = S LoRC's sinks, as a partial output."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    rb = pid % NRB
    b = pid // NRB // Hkv
    kvh = pid // NRB % Hkv
    bh = (b * Hkv + kvh).to(tl.int64)
    brow = b.to(tl.int64)
    n_pre = tl.load(Lens).to(tl.int32)
    n_dec = tl.load(Lens + 1).to(tl.int32)
    n_buf = tl.load(Lens + 2).to(tl.int32)
    past = n_pre + n_dec + n_buf
    total = past + T_NEW
    shift = mask_len - total     # key position -> mask column (its last column is the newest key)

    rows = rb * MP + tl.arange(0, MP)     # rows g * T + i: query head g of this KV head, token i
    ok_m = rows < M
    g = rows // T
    qi = rows % T
    qrow = ((bh * G + g) * T + qi).to(tl.int64)     # q's [B, Hq, T] rows
    mrow = b * mask_sb + (kvh * G + g) * mask_sh + qi * mask_st
    limit = total - T + qi                           # the newest key row i sees (causal)
    dd = tl.arange(0, DP)
    ok_d = dd < D
    Cos += brow * cs_b
    Sin += brow * cs_b
    qk_scale = tl.cast(qk_scale, tl.float32)
    DT: tl.constexpr = Q.dtype.element_ty
    P_ROW_TILE: tl.constexpr = K_CHANNEL and K_GROUP % BT == 0   # a prefill tile inside one stats row
    m_i = tl.full([MP], float("-inf"), tl.float32)
    l_i = tl.zeros([MP], tl.float32)

    if split == S:      # LoRC's sinks: K before RoPE, V in head space
        acc_d = tl.zeros([MP, DP], tl.float32)
        q = _query(Q, qrow, dd, ok_m, qk_scale, D)
        src, sign = _rot_source(dd, rd, ROPE)
        for t0 in range(0, S_LORC, LBT):
            t = t0 + tl.arange(0, LBT)
            ok_t = t < S_LORC
            at = (bh * S_LORC + t)[:, None] * D
            k = tl.load(LSk + at + dd[None, :], mask=ok_t[:, None] & ok_d[None, :], other=0.0).to(tl.float32)
            if ROPE != 0:
                kr = tl.load(LSk + at + src[None, :], mask=ok_t[:, None] & (dd < rd)[None, :], other=0.0)
                k = _rotate(k, kr.to(tl.float32) * sign[None, :], Cos, Sin, t, ok_t, dd, rd)
            v = tl.load(LSv + at + dd[None, :], mask=ok_t[:, None] & ok_d[None, :], other=0.0)
            m_i, l_i, acc_d = _fold(m_i, l_i, acc_d, _mma(q, tl.trans(k), DT, FP32_DOT), v, t, ok_t, limit,
                                    shift, ok_m, Mask, mrow, mask_sl, DT, FP32_DOT, MASK_KIND, CAUSAL)
        o = acc_d / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(PO + (qrow * (S + 1) + split)[:, None] * D + dd[None, :], o, mask=ok_m[:, None] & ok_d[None, :])
    else:               # the s-th range of the latent work list
        e = tl.arange(0, KE)
        kch = (e // KWP) * KW + e % KWP                # extended axis -> latent channel
        ok_kc = (e % KWP < KW) & (kch < KD)
        e = tl.arange(0, VE)
        vch = (e // VWP) * VW + e % VWP
        ok_vc = (e % VWP < VW) & (vch < VD)
        Ukh = Uk + kvh * RK * D
        acc = tl.zeros([MP, VE], tl.float32)

        items_c = tl.cdiv(N_SINK, SBT)
        p_first = tl.maximum(N_SINK, S_LORC)          # the codec's and LoRC's sinks shadow the block's first
        p_tile0 = p_first // BT
        items_p = tl.maximum(tl.cdiv(n_pre, BT) - p_tile0, 0)
        if STORE_EXACT:
            items_d = tl.cdiv(n_dec, DBT)
        else:
            items_d = tl.cdiv(n_dec, d_block) * D_TPB
        items_b = tl.cdiv(n_buf, XBT)
        items_n = tl.cdiv(T_NEW, NBT)
        n_items = items_c + items_p + items_d + items_b + items_n
        per = tl.cdiv(n_items, S)
        w0 = split * per
        w1 = tl.minimum(w0 + per, n_items)

        lo, hi = _segment_range(w0, w1, 0, items_c)
        if lo < hi:     # the codec's exact sinks (latents)
            m_i, l_i, acc = _latent_pass(
                m_i, l_i, acc, Q, qrow, qk_scale, lo, hi, 0, S_LORC, N_SINK, 0, N_SINK,
                SKc + brow * N_SINK * KD, SKc, SKc, SKc, SKc, SKc, SKc, SKc, SKc,
                SVc + brow * N_SINK * VD, SVc, SVc, SVc, SVc, SVc, SVc, SVc, SVc,
                1, 1, 0, Ukh, Cos, Sin, rd, kch, ok_kc, vch, ok_vc,
                limit, shift, ok_m, Mask, mrow, mask_sl,
                DT, D, DP, DC, MP, KD, KW, KWP, KPB, KE, VD, VW, VWP, VPB, VE, 0, True, False, False, False, 0, RP,
                False, CB, 0, OUT_UNIT, False, FP32_DOT, MASK_KIND, CAUSAL, ROPE, SBT, 1, True, 1)
        off = items_c
        lo, hi = _segment_range(w0, w1, off, items_p)
        if lo < hi:     # the prefill block
            pkc, pks, pkz, pka, pkb, pkls, pkov, pkoi, pkop = _store_parts(
                brow, P_CAP, 1, PKc, PKs, PKz, PKa, PKb, PKls, PKov, PKoi, PKop, pk_group, pk_k2,
                KD, KW, K_CHANNEL, P_R, True)
            pvc, pvs, pvz, pva, pvb, pvls, pvov, pvoi, pvop = _store_parts(
                brow, P_CAP, 1, PVc, PVs, PVz, PVa, PVb, PVls, PVov, PVoi, PVop, pv_group, VK2,
                VD, VW, V_CHANNEL, P_R, False)
            m_i, l_i, acc = _latent_pass(
                m_i, l_i, acc, Q, qrow, qk_scale, lo, hi, p_tile0, p_first, n_pre, 0, P_CAP,
                pkc, pks, pkz, pka, pkb, pkls, pkov, pkoi, pkop, pvc, pvs, pvz, pva, pvb, pvls, pvov, pvoi, pvop,
                pk_group, pv_group, pk_k2 * KD, Ukh, Cos, Sin, rd, kch, ok_kc, vch, ok_vc,
                limit, shift, ok_m, Mask, mrow, mask_sl,
                DT, D, DP, DC, MP, KD, KW, KWP, KPB, KE, VD, VW, VWP, VPB, VE, BITS, STORE_EXACT, K_CHANNEL, V_CHANNEL,
                P_ROW_TILE, P_R, RP, P_K_OUT, CB, VK2, OUT_UNIT, MAGIC, FP32_DOT,
                MASK_KIND, CAUSAL, ROPE, BT, 1, True, STAGES)
        off += items_p
        lo, hi = _segment_range(w0, w1, off, items_d)
        if lo < hi:     # the decode blocks
            dkc, dks, dkz, dka, dkb, dkls, dkov, dkoi, dkop = _store_parts(
                brow, D_CAP, D_CAP // d_block, DKc, DKs, DKz, DKa, DKb, DKls, DKov, DKoi, DKop, dk_group, dk_k2,
                KD, KW, K_CHANNEL, D_R, True)
            dvc, dvs, dvz, dva, dvb, dvls, dvov, dvoi, dvop = _store_parts(
                brow, D_CAP, D_CAP // d_block, DVc, DVs, DVz, DVa, DVb, DVls, DVov, DVoi, DVop, dv_group, VK2,
                VD, VW, V_CHANNEL, D_R, False)
            if STORE_EXACT:
                block = D_CAP
            else:
                block = d_block
            m_i, l_i, acc = _latent_pass(
                m_i, l_i, acc, Q, qrow, qk_scale, lo, hi, 0, S_LORC - n_pre, n_dec, n_pre, block,
                dkc, dks, dkz, dka, dkb, dkls, dkov, dkoi, dkop, dvc, dvs, dvz, dva, dvb, dvls, dvov, dvoi, dvop,
                dk_group, dv_group, dk_k2 * KD, Ukh, Cos, Sin, rd, kch, ok_kc, vch, ok_vc,
                limit, shift, ok_m, Mask, mrow, mask_sl,
                DT, D, DP, DC, MP, KD, KW, KWP, KPB, KE, VD, VW, VWP, VPB, VE, BITS, STORE_EXACT, K_CHANNEL, V_CHANNEL,
                D_K_ROW_TILE, D_R, RP, D_K_OUT, CB, VK2, OUT_UNIT, MAGIC, FP32_DOT,
                MASK_KIND, CAUSAL, ROPE, DBT, D_TPB, STORE_EXACT, STAGES)
        off += items_d
        lo, hi = _segment_range(w0, w1, off, items_b)
        if lo < hi:     # the buffer (exact latents)
            m_i, l_i, acc = _latent_pass(
                m_i, l_i, acc, Q, qrow, qk_scale, lo, hi, 0, S_LORC - n_pre - n_dec, n_buf, n_pre + n_dec, BUF_CAP,
                BKc + brow * BUF_CAP * KD, BKc, BKc, BKc, BKc, BKc, BKc, BKc, BKc,
                BVc + brow * BUF_CAP * VD, BVc, BVc, BVc, BVc, BVc, BVc, BVc, BVc,
                1, 1, 0, Ukh, Cos, Sin, rd, kch, ok_kc, vch, ok_vc,
                limit, shift, ok_m, Mask, mrow, mask_sl,
                DT, D, DP, DC, MP, KD, KW, KWP, KPB, KE, VD, VW, VWP, VPB, VE, 0, True, False, False, False, 0, RP,
                False, CB, 0, OUT_UNIT, False, FP32_DOT, MASK_KIND, CAUSAL, ROPE, XBT, 1, True, 1)
        off += items_b
        lo, hi = _segment_range(w0, w1, off, items_n)
        for i in range(lo, hi):     # the call's new tokens: K exact and rotated, V as latents
            t = i * NBT + tl.arange(0, NBT)
            ok_t = t < T_NEW
            k = tl.load(Nk + (bh * T_NEW + t)[:, None] * D + dd[None, :], mask=ok_t[:, None] & ok_d[None, :],
                        other=0.0)
            v = tl.load(Nv + (brow * T_NEW + t)[:, None] * RV + vch[None, :],
                        mask=ok_t[:, None] & (ok_vc & (vch < RV))[None, :], other=0.0)
            s = _mma(_query(Q, qrow, dd, ok_m, qk_scale, D), tl.trans(k), DT, FP32_DOT)
            m_i, l_i, acc = _fold(m_i, l_i, acc, s, v, past + t, ok_t, limit, shift, ok_m, Mask, mrow, mask_sl,
                                  DT, FP32_DOT, MASK_KIND, CAUSAL)
        # U_v^T once, DC head channels at a time: the normalised latent output times this KV head's rows
        lat = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        for c0 in tl.static_range(0, DP, DC):
            dc = c0 + tl.arange(0, DC)
            uv = tl.load(Uv + (kvh * RV + vch)[:, None] * D + dc[None, :],
                         mask=(ok_vc & (vch < RV))[:, None] & (dc < D)[None, :], other=0.0)
            tl.store(PO + (qrow * (S + 1) + split)[:, None] * D + dc[None, :], _mma(lat, uv, DT, FP32_DOT),
                     mask=ok_m[:, None] & (dc < D)[None, :])

    has = l_i > 0
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(PLSE + qrow * (S + 1) + split, lse, mask=ok_m)
