"""The inner loops of the Triton decode attention: one pass over a segment's tiles.

Job: given the online-softmax state of one program (running max m, sum l,
output accumulator acc [GP, E] and acc_z [GP], the value zero points folded
out of acc), a pass reads the tiles [lo, hi) of one segment of the store and
folds them into that state. `decode_attention` owns the kernel that calls
the passes (one per segment, in the order of its flat work list), the split
of that list over programs, and the launcher. Neighbours: `segment` /
`outliers` (the layout read here), `packing` (planar bit fields).

Every pass loop is `tl.range(lo, hi, num_stages=STAGES)` with its bounds
computed before it, and every load in the loop body is masked, never under
an `if`, so Triton software-pipelines the loads of tile i + 1.. while tile i
computes. (The Triton interpreter runs the same loop: with the index patch in
`kernels/__init__` it takes a bound read from memory.)

Axes: a tile holds BT tokens by E "extended channels" (e = field * WP + byte:
every bit field of a byte tile unpacked at once, `packing`'s planar order),
GP rows are the query heads of one KV head (padded to 16 for tl.dot).

Dequantization: `decode_fields` (the codes and their (scale, zero) as dot
operands, fp16 without conversions). Scale/zero folding (q' = q * s, q . z) is done where one stats row covers the
whole segment (K on the channel axis with one group per block: KCVT's
prefill block), once before the loop; per tile it would cost a cross-lane
reduction of q . z every tile, more than the one packed FMA per two codes
that dequantizing costs. V with one (s, z) per token folds s into p (one
multiply per score instead of per code) and accumulates p . z in acc_z [GP],
added to every channel once at the end.

GEAR terms (item 3): low-rank K adds ((q . B_blk) s) . A_t to the scores and
low-rank V adds ((p . A) s) . B_blk^T to the output. In a one-block segment
(the prefill block) q . B diag(s) is computed once before the loop, and V's
p . A is accumulated in rank space [GP, RP] through the loop and B^T applied
once after it: one small tl.dot per tile each for K and V. A multi-block
segment's tile is one block (n_b <= BT), so per tile is per block there.

Outliers (item 4). K's are tile-CSR records (`outliers.records`): a tile's
records are the contiguous run [ptr[tile0 / 16], ptr[(tile0 + BT) / 16]) of
its block, read as one masked window of KC records and added at score
level: record (t, c, val) adds q[c] s(t, c) val unit to the score of token
t, the [GP, KC] products put at their tokens by one-hot tl.dots that
accumulate into the scores, RECORD_CHUNK records each. The one-hot is built
token-major ([BT, RECORD_CHUNK], then transposed), so that a warp's lanes
hold different records: built record-major, every lane of a warp decoded
the same records (sm_90a, GEAR-4 d 128, 64-token tile, 8 warps: 342 -> 166
loads and 4384 -> 2909 SASS lines a tile).
No walk, no branch, no load depending on another beyond the two pointers.
A tile with more than KC records (`decode_plan.record_window` sizes KC at
1.5x the block's mean) is masked out of the pipelined loop (OVERFLOW false)
and read by a program of its own (OVERFLOW true: the kernel's programs
S.. 2S - 1, one per range of the work list, each a partial the combine
merges like the others): a vectorised scan of the range's record pointers,
OVERFLOW_SCAN tiles a load, finds the overflowing tiles, and each is read
with its records one RECORD_CHUNK a trip (the chunks add to the scores in
the same order as in the window), so no record is ever dropped. The
pipelined loop's program holds no code of that path: in the same program,
after the loop, it left the main loop no registers to spare (sm_90a, GEAR-4
d 128, 64-token tile, 8 warps: a 232-byte stack; as programs of their own,
the main loops spill nothing). V's are per token (2k channel indices): added
to the codes as a dense [BT, E] tile, 2k compare-selects per code.
"""
import triton
import triton.language as tl

from .decode_fields import (code_operands, field_channels, join_fields, split_fields, stats, token_group_stats,
                            token_pairs)

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)   # the scores are in base 2


@triton.jit
def _mma(a, b, DT: tl.constexpr, FP32_DOT: tl.constexpr):
    """a @ b with both operands rounded to DT (the query dtype), fp32 accumulate.
    FP32_DOT runs the product on fp32 values: for fp32 q, and for bf16 under
    the interpreter, whose bf16 dot is wrong (the interpreter's dot is exact
    fp32). Compiled, as 3xTF32 tensor-core products (hi * hi + hi * lo +
    lo * hi, about fp32's accuracy; bf16 values are exact in it): as
    input_precision="ieee" they ran as FMAs, whose operand layouts give each
    thread a whole row of the reduction axis, and spilled 1.3-2.4 KB a thread
    (sm_90a, GEAR-2 / GEAR-4 d 128, 64-token tile, 8 warps)."""
    return _mma_acc(a, b, tl.zeros([a.shape[0], b.shape[1]], tl.float32), DT, FP32_DOT)


@triton.jit
def _mma_acc(a, b, acc, DT: tl.constexpr, FP32_DOT: tl.constexpr):
    """acc + a @ b, acc the product's accumulator (operands as `_mma`'s)."""
    if FP32_DOT:
        return tl.dot(a.to(DT).to(tl.float32), b.to(DT).to(tl.float32), acc, input_precision="tf32x3")
    return tl.dot(a.to(DT), b.to(DT), acc)


@triton.jit
def _factor(x, MAGIC: tl.constexpr):
    """An int8 low-rank factor as a dot operand: straight to fp16 with fp16
    queries (one exact conversion), else through fp32 (the interpreter's
    int8 -> bf16 cast is wrong)."""
    if MAGIC:
        y = x.to(tl.float16)
    else:
        y = x.to(tl.float32)
    return y   # one return: the compiler unifies every return's type, constexpr branches included


@triton.jit
def _stats_at(scale, t0, t, c, ok, group, D: tl.constexpr, AXIS_CHANNEL: tl.constexpr,
              ROW_TILE: tl.constexpr):
    """K's scale (fp32) at places (token t, channel c); with ROW_TILE (the
    tile, first token t0, inside one channel-axis row) the row is the
    tile's, one division a tile instead of one a place."""
    if AXIS_CHANNEL:
        if ROW_TILE:
            sidx = (t0 // group) * D + c
        else:
            sidx = (t // group) * D + c
    else:
        sidx = t * (D // group) + c // group
    return tl.load(scale + sidx, mask=ok, other=0.0).to(tl.float32)


RECORD_CHUNK: tl.constexpr = tl.constexpr(64)   # records per one-hot product (registers: 32 x BT)
OVERFLOW_SCAN: tl.constexpr = tl.constexpr(64)  # tiles whose record counts one overflow-scan load reads


@triton.jit
def _k_record_scores(s, Kov, Koi, Ks, Qg, ok_g, qk_scale, r_lo, r_hi, tile_t0, tile_at, group,
                     D: tl.constexpr, CB: tl.constexpr, C: tl.constexpr, BT: tl.constexpr,
                     K_CHANNEL: tl.constexpr, K_ROW_TILE: tl.constexpr, OUT_UNIT: tl.constexpr,
                     DT: tl.constexpr, FP32_DOT: tl.constexpr):
    """Scores s [GP, BT] plus what the K outlier records [r_lo, min(r_lo + C,
    r_hi)) add to a tile whose first token is tile_t0 in the segment
    (tile_at in its block): record r adds val_r units at (t_r, c_r), so
    q . k_t gains q[c_r] * s(t_r, c_r) * val_r * unit at t_r. Each record's
    q[c_r] is read back from Qg, this KV head's query rows (L1-resident; 32-bit
    offsets from one pointer), for the live rows, and a
    tl.dot per chunk of the window with the one-hot [RECORD_CHUNK, BT] that
    holds each record's factor at its token adds the products there, s the
    products' accumulator (chunks bound the registers the one-hot takes): no
    walk, no branch, no dependent load beyond the window's."""
    g = tl.arange(0, ok_g.shape[0])
    for j in tl.static_range(C // RECORD_CHUNK):
        r = r_lo + j * RECORD_CHUNK + tl.arange(0, RECORD_CHUNK)
        ok_r = r < r_hi
        val = tl.load(Kov + r, mask=ok_r, other=0).to(tl.float32)
        pos = tl.load(Koi + r, mask=ok_r, other=0).to(tl.int32) & ((1 << (CB + 8)) - 1)
        c = pos & ((1 << CB) - 1)
        t_in = ((pos >> CB) & 255) - tile_at % 256       # kernel tiles never cross 256 tokens
        w = val * (OUT_UNIT * qk_scale) * _stats_at(Ks, tile_t0, tile_t0 + t_in, c, ok_r, group, D, K_CHANNEL,
                                                    K_ROW_TILE)
        qc = tl.load(Qg + g[:, None] * D + c[None, :], mask=ok_g[:, None] & ok_r[None, :], other=0.0)
        # the one-hot carries w (one rounding to DT, as the codes' dot has), q[c_r] stays exact
        w = w.to(DT)
        # built token-major, [BT, RECORD_CHUNK], so that the records lie along the lanes of a warp
        at = (tl.arange(0, BT)[:, None] == t_in[None, :]) & ok_r[None, :]
        s = _mma_acc(qc, tl.trans(tl.where(at, w[None, :], tl.zeros_like(w)[None, :])), s, DT, FP32_DOT)
    return s


@triton.jit
def _v_outlier_table(oval, oidx, t, ok_t, unit, K2: tl.constexpr):
    """Tokens t's V outliers: K2 = 2k (channel index, value in units) columns."""
    table = ()
    for o in tl.static_range(K2):
        oi = tl.load(oidx + t * K2 + o, mask=ok_t, other=0).to(tl.int32)
        ov = tl.load(oval + t * K2 + o, mask=ok_t, other=0).to(tl.float32) * unit
        table = table + ((oi, ov),)
    return table


@triton.jit
def _add_v_outliers(c, table, ch, K2: tl.constexpr):
    """Codes c [BT, places of channels ch] with the table's units added: a
    select per code and entry, in c's own dtype (no second tile)."""
    for o in tl.static_range(K2):
        oi, ov = table[o]
        c = tl.where(ch[None, :] == oi[:, None], c + ov.to(c.dtype)[:, None], c)
    return c


@triton.jit
def _with_v_outliers(c, oval, oidx, t, ok_t, ch, unit, K2: tl.constexpr):
    """Codes c [BT, E] of tokens t with their V outliers' units added."""
    return _add_v_outliers(c, _v_outlier_table(oval, oidx, t, ok_t, unit, K2), ch, K2)


@triton.jit
def _finish_scores(s, cap, Mask, mrow, pos, ok_g, ok_t, mask_sl, SOFTCAP: tl.constexpr,
                   MASK_KIND: tl.constexpr):
    """Scores [GP, BT] after the soft cap (s and cap in base-2 units:
    cap tanh(s / cap)) and the attention mask (MASK_KIND 1 bool / 2 additive:
    mrow [GP] + pos * mask_sl addresses each (query head, key position);
    3 / 4: one row for every head, mrow its scalar offset, loaded as one
    [BT] vector; keys before the mask's first column, pos < 0, are hidden),
    -inf outside the tile's live tokens."""
    if SOFTCAP:
        s = cap * (1.0 - 2.0 / (tl.exp(2.0 * s / cap) + 1.0))
    if MASK_KIND > 2:
        mp = Mask + mrow + pos * mask_sl
        ok_m = ok_t & (pos >= 0)
        if MASK_KIND == 3:   # bool, True = keep
            keep = tl.load(mp, mask=ok_m, other=1)
            s = tl.where((keep != 0)[None, :], s, float("-inf"))
        else:                # additive, natural log: times log2(e) for base 2
            s += (tl.load(mp, mask=ok_m, other=0.0).to(tl.float32) * LOG2E)[None, :]
        s = tl.where((pos >= 0)[None, :], s, float("-inf"))
    elif MASK_KIND != 0:
        ok_m = ok_g[:, None] & (ok_t & (pos >= 0))[None, :]
        mp = Mask + mrow[:, None] + pos[None, :] * mask_sl
        if MASK_KIND == 1:
            keep = tl.load(mp, mask=ok_m, other=1)
            s = tl.where(keep != 0, s, float("-inf"))
        else:
            s += tl.load(mp, mask=ok_m, other=0.0).to(tl.float32) * LOG2E
        s = tl.where((pos >= 0)[None, :], s, float("-inf"))
    return tl.where(ok_t[None, :], s, float("-inf"))


@triton.jit
def _softmax_step(s, m_i, l_i):
    """Online softmax over one more tile of base-2 scores s: (p, the factor
    alpha rescaling what was accumulated so far, new max, new sum)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def exact_pass(m_i, l_i, acc, acc_z, q, Xk, Xv, lo, hi, tile0, t_first, n_valid, pos0,
               ch, ok_c, ok_g, cap, Mask, mrow, mask_sl,
               DT: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, STAGES: tl.constexpr,
               FP32_DOT: tl.constexpr, SOFTCAP: tl.constexpr, MASK_KIND: tl.constexpr):
    """Tiles [lo, hi) of a segment of exact K/V values (Xk, Xv [N, D] of this
    head): tile i holds tokens (tile0 + i) * BT + [0, BT), those in
    [t_first, n_valid) live; key position = pos0 + token."""
    for i in tl.range(lo, hi, num_stages=STAGES):
        t = (tile0 + i) * BT + tl.arange(0, BT)
        ok_t = (t < n_valid) & (t >= t_first)
        ok = ok_t[:, None] & ok_c[None, :]
        k = tl.load(Xk + t[:, None] * D + ch[None, :], mask=ok, other=0.0)
        v = tl.load(Xv + t[:, None] * D + ch[None, :], mask=ok, other=0.0)
        s = _finish_scores(_mma(q, tl.trans(k), DT, FP32_DOT), cap, Mask, mrow, pos0 + t, ok_g, ok_t,
                           mask_sl, SOFTCAP, MASK_KIND)
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i)
        acc = acc * alpha[:, None] + _mma(p, v, DT, FP32_DOT)
        acc_z = acc_z * alpha
    return m_i, l_i, acc, acc_z


@triton.jit
def _compressed_tile(m_i, l_i, accs, acc_z, acc_r, qs, qz, qb, Qg, qk_scale, item, t_first, n_valid,
                     pos0, Kc, Ks, Kz, Ka, Kb, Kls, Kov, Koi, Kop, Vc, Vs, Vz, Va, Vb, Vls, Vov, Voi,
                     block, k_group, v_group, k2d, ok_g, cap, Mask, mrow, mask_sl,
                     DT: tl.constexpr, D: tl.constexpr, W: tl.constexpr, WP: tl.constexpr,
                     PB: tl.constexpr, E: tl.constexpr, NF: tl.constexpr, BT: tl.constexpr,
                     TPB: tl.constexpr, ONE_BLOCK: tl.constexpr, BITS: tl.constexpr, K_CHANNEL: tl.constexpr,
                     V_CHANNEL: tl.constexpr, K_FOLD: tl.constexpr, K_ROW_TILE: tl.constexpr,
                     V_GROUPS: tl.constexpr, K_GROUPS: tl.constexpr, R: tl.constexpr, RP: tl.constexpr,
                     K_OUT: tl.constexpr,
                     CB: tl.constexpr, KC: tl.constexpr, OVERFLOW: tl.constexpr, VK2: tl.constexpr,
                     OUT_UNIT: tl.constexpr, MAGIC: tl.constexpr, FP32_DOT: tl.constexpr,
                     SOFTCAP: tl.constexpr, MASK_KIND: tl.constexpr):
    """One tile of a compressed segment folded into the online-softmax
    state, its codes NF dot operands (`decode_fields`): qs the query rows
    and accs the output split alike (qs with K's stats folded in under
    K_FOLD). OVERFLOW false (the main loop): a tile whose K outlier records
    overflow the KC-record window is skipped whole (every load masked) for
    the overflow programs; OVERFLOW true: only such a tile is read, its
    records one RECORD_CHUNK a trip (a loop, so that no record is ever
    dropped)."""
    r = tl.arange(0, RP)
    ok_r = r < R
    if ONE_BLOCK:
        blk = item * 0
        tile_at = item * BT                    # the tile's first token in its block
    else:
        blk = item // TPB
        tile_at = (item % TPB) * BT
    t_blk = tile_at + tl.arange(0, BT)
    t = blk * block + t_blk
    ok_t = (t_blk < block) & (t < n_valid) & (t >= t_first)
    over = item * 0
    if K_OUT:      # the tile's records: [ptr[tile_at / 16], ptr[(tile_at + BT) / 16]) of the block's
        ptrs = Kop + blk * (tl.cdiv(block, 16) + 1)
        r_lo = tl.load(ptrs + tile_at // 16)
        r_hi = tl.load(ptrs + tl.minimum((tile_at + BT) // 16, tl.cdiv(block, 16)))
        over = tl.where(r_hi - r_lo > KC, 1, 0)
        # (tl.where, not &: the interpreter turns a bool tile & a bool scalar into int32)
        if OVERFLOW:
            ok_t = tl.where(over != 0, ok_t, False)
        else:
            ok_t = tl.where(over == 0, ok_t, False)

    # scores: q . k_t, k = (codes + outlier units) * s + z, plus low rank
    cs = code_operands(Kc, t, ok_t, W, WP, PB, E, NF, BT, BITS, MAGIC)
    # K per token (K_GROUPS pairs a token) with every field inside one group: its pair [BT] a field
    K_FIELD_TOKEN: tl.constexpr = K_GROUPS > 0 and NF > 1 and (D // K_GROUPS) % W == 0
    if K_FIELD_TOKEN:
        kstats = token_pairs(Ks, Kz, t, ok_t, K_GROUPS)
    s = tl.zeros([qs[0].shape[0], BT], tl.float32)
    for F in tl.static_range(NF):
        if K_FOLD:
            s = _mma_acc(qs[F], tl.trans(cs[F]), s, DT, FP32_DOT)
        elif K_FIELD_TOKEN:   # the field's group of K's per-token pairs, [BT]
            sk, zk = kstats[F * W // (D // K_GROUPS)]
            s = _mma_acc(qs[F], tl.trans(cs[F] * sk[:, None] + zk[:, None]), s, DT, FP32_DOT)
        else:
            ch, ok_c = field_channels(F, E // NF, W, WP, D)
            sk, zk = stats(Ks, Kz, blk * block + tile_at, t, ok_t, ch, ok_c, k_group, D, K_CHANNEL,
                           K_ROW_TILE, MAGIC)
            s = _mma_acc(qs[F], tl.trans(cs[F] * sk + zk), s, DT, FP32_DOT)
    if K_FOLD:
        s += qz[:, None]
    if K_OUT:
        rec_v = Kov + blk * k2d
        rec_i = Koi + blk * k2d
        if OVERFLOW:
            # one chunk a trip: the overflow loop's registers stay those of one chunk, and the
            # chunks add to s in the order the main loop's window adds them
            for w0 in range(r_lo, r_hi, RECORD_CHUNK):
                s = _k_record_scores(s, rec_v, rec_i, Ks, Qg, ok_g, qk_scale, w0, r_hi,
                                     blk * block + tile_at, tile_at, k_group, D, CB, RECORD_CHUNK, BT,
                                     K_CHANNEL, K_ROW_TILE, OUT_UNIT, DT, FP32_DOT)
        else:
            s = _k_record_scores(s, rec_v, rec_i, Ks, Qg, ok_g, qk_scale, r_lo,
                                 tl.where(over != 0, r_lo, r_hi), blk * block + tile_at, tile_at,
                                 k_group, D, CB, KC, BT, K_CHANNEL, K_ROW_TILE, OUT_UNIT, DT, FP32_DOT)
    if R > 0:
        a = tl.load(Ka + t[:, None] * R + r[None, :], mask=ok_t[:, None] & ok_r[None, :], other=0)
        if not ONE_BLOCK:   # a tile is one block: its q . B diag(s) (qs unfolded: K_FOLD is one block's)
            qb = tl.zeros([qs[0].shape[0], RP], tl.float32)
            for F in tl.static_range(NF):
                ch, ok_c = field_channels(F, E // NF, W, WP, D)
                bk = tl.load(Kb + (blk * D + ch)[:, None] * R + r[None, :],
                             mask=ok_c[:, None] & ok_r[None, :], other=0)
                qb = _mma_acc(qs[F], _factor(bk, MAGIC), qb, DT, FP32_DOT)
            qb = qb * tl.load(Kls + blk * R + r, mask=ok_r, other=0.0)[None, :]
        s += _mma(qb, tl.trans(_factor(a, MAGIC)), DT, FP32_DOT)
    s = _finish_scores(s, cap, Mask, mrow, pos0 + t, ok_g, ok_t, mask_sl, SOFTCAP, MASK_KIND)
    p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i)

    # values: p . v, v = (codes + outlier units) * s + z, plus low rank
    cs = code_operands(Vc, t, ok_t, W, WP, PB, E, NF, BT, BITS, MAGIC)
    table = _v_outlier_table(Vov, Voi, t, ok_t, OUT_UNIT, VK2)
    acc_z = acc_z * alpha
    # V's per-token (s, z): one pair a token (V_GROUPS 1) folded into p (p s . c + p . z); or, where
    # every field lies in one of a token's V_GROUPS channel groups, its group's pair [BT] applied to
    # the field's codes where they lie (c s + z, a packed FMA per two codes)
    V_FIELD_TOKEN: tl.constexpr = V_GROUPS > 1 and NF > 1 and (D // V_GROUPS) % W == 0
    ps = p
    if V_FIELD_TOKEN:
        vstats = token_pairs(Vs, Vz, t, ok_t, V_GROUPS)
    if V_GROUPS == 1:
        sv = tl.load(Vs + t, mask=ok_t, other=0.0).to(tl.float32)
        zv = tl.load(Vz + t, mask=ok_t, other=0.0).to(tl.float32)
        ps = p * sv[None, :]
        acc_z += tl.sum(p * zv[None, :], axis=1)
    if R > 0:
        a = tl.load(Va + t[:, None] * R + r[None, :], mask=ok_t[:, None] & ok_r[None, :], other=0)
        pa = _mma(p, _factor(a, MAGIC), DT, FP32_DOT)
        if ONE_BLOCK:   # rank space; B^T once after the loop
            acc_r = acc_r * alpha[:, None] + pa
        else:
            pa = pa * tl.load(Vls + blk * R + r, mask=ok_r, other=0.0)[None, :]
    new = ()
    for F in tl.static_range(NF):
        ch, ok_c = field_channels(F, E // NF, W, WP, D)
        c = _add_v_outliers(cs[F], table, ch, VK2)
        acc = accs[F] * alpha[:, None]
        if V_GROUPS == 1:
            acc = _mma_acc(ps, c, acc, DT, FP32_DOT)
        elif V_FIELD_TOKEN:   # the field's group: F * W // (D // V_GROUPS)
            sv, zv = vstats[F * W // (D // V_GROUPS)]
            acc = _mma_acc(p, c * sv[:, None] + zv[:, None], acc, DT, FP32_DOT)
        else:
            if V_GROUPS > 1 and NF == 1:   # each token's pairs loaded once, broadcast over its channels
                sv, zv = token_group_stats(Vs, Vz, t, ok_t, BT, D, V_GROUPS, MAGIC)
            else:
                sv, zv = stats(Vs, Vz, blk * block + tile_at, t, ok_t, ch, ok_c, v_group, D, V_CHANNEL,
                                False, MAGIC)
            acc = _mma_acc(p, c * sv + zv, acc, DT, FP32_DOT)
        if R > 0:
            if not ONE_BLOCK:
                bv = tl.load(Vb + (blk * D + ch)[:, None] * R + r[None, :],
                             mask=ok_c[:, None] & ok_r[None, :], other=0)
                acc = _mma_acc(pa, tl.trans(_factor(bv, MAGIC)), acc, DT, FP32_DOT)
        new = new + (acc,)
    return m_i, l_i, new, acc_z, acc_r


@triton.jit
def compressed_pass(m_i, l_i, acc, acc_z, q, Qg, qk_scale, lo, hi, tile0, t_first, n_valid, pos0,
                    Kc, Ks, Kz, Ka, Kb, Kls, Kov, Koi, Kop, Vc, Vs, Vz, Va, Vb, Vls, Vov, Voi,
                    block, k_group, v_group, k2d, ch, ok_c, ok_g, cap, Mask, mrow, mask_sl,
                    DT: tl.constexpr, D: tl.constexpr, W: tl.constexpr, WP: tl.constexpr,
                    PB: tl.constexpr, E: tl.constexpr, GP: tl.constexpr, BT: tl.constexpr,
                    TPB: tl.constexpr, ONE_BLOCK: tl.constexpr, BITS: tl.constexpr,
                    K_CHANNEL: tl.constexpr, V_CHANNEL: tl.constexpr, K_FOLD: tl.constexpr,
                    K_ROW_TILE: tl.constexpr, V_GROUPS: tl.constexpr, K_GROUPS: tl.constexpr, R: tl.constexpr,
                    RP: tl.constexpr, K_OUT: tl.constexpr, CB: tl.constexpr, KC: tl.constexpr,
                    VK2: tl.constexpr, OUT_UNIT: tl.constexpr, MAGIC: tl.constexpr,
                    FP32_DOT: tl.constexpr, SOFTCAP: tl.constexpr, MASK_KIND: tl.constexpr,
                    STAGES: tl.constexpr, OVERFLOW: tl.constexpr):
    """Tiles [lo, hi) of a compressed segment (this head's parts): item i is
    tile (tile0 + i) % TPB of block (tile0 + i) // TPB (ONE_BLOCK: the
    segment is one block of `block` tokens and every tile is in it), its
    tokens in [t_first, n_valid) live; key position = pos0 + token. K's
    outlier records (tile-CSR, `outliers.records`) are read in a window of
    KC records per tile; the rare tile holding more is skipped by the
    pipelined loop and read, OVERFLOW true, by an overflow program, which
    runs only those tiles of [lo, hi) (each partial is an online softmax of
    its own tiles; the combine merges them). The codes are NF dot operands
    (`decode_fields`): the query rows and the output are split into NF
    column blocks before the loop and the output joined after it."""
    # fields for fp16 queries, each at least tl.dot's 16 wide, in stores without V outliers: with
    # them (GEAR-2 / GEAR-4) the fields spilled (sm_90a, d 128, 32-token tile, 8 warps: 24-128
    # bytes) and K's alone saved nothing (results/kernel_sass_sm90.md)
    NF: tl.constexpr = PB if MAGIC and WP >= 16 and (PB == 2 or PB == 4) and VK2 == 0 else 1
    r = tl.arange(0, RP)
    ok_r = r < R
    # hoisted out of the loop (see the module docstring): K's folded stats
    # when one row covers the segment, the one block's low-rank q . B diag(s)
    qk = q
    qz = tl.zeros([GP], tl.float32)
    if K_FOLD:
        sk = tl.load(Ks + ch, mask=ok_c, other=0.0).to(tl.float32)
        zk = tl.load(Kz + ch, mask=ok_c, other=0.0).to(tl.float32)
        qk = q * sk[None, :]
        qz = tl.sum(q * zk[None, :], axis=1)
    qs = split_fields(qk, GP, NF, E // NF)
    qb = tl.zeros([GP, RP], tl.float32)
    acc_r = tl.zeros([GP, RP], tl.float32)
    if R > 0:
        if ONE_BLOCK:
            bk = tl.load(Kb + ch[:, None] * R + r[None, :], mask=ok_c[:, None] & ok_r[None, :], other=0)
            sr = tl.load(Kls + r, mask=ok_r, other=0.0)
            qb = _mma(q, _factor(bk, MAGIC), DT, FP32_DOT) * sr[None, :]
    accs = split_fields(acc, GP, NF, E // NF)
    if OVERFLOW:
        # the tiles of [lo, hi) whose records overflow the window (rare): found by a vectorised
        # scan of their record pointers, OVERFLOW_SCAN tiles a load, then read one by one
        for j0 in range(lo, hi, OVERFLOW_SCAN):
            it = j0 + tl.arange(0, OVERFLOW_SCAN)
            ok_i = it < hi
            if ONE_BLOCK:
                blk_i = it * 0
                at_i = (tile0 + it) * BT
            else:
                blk_i = (tile0 + it) // TPB
                at_i = ((tile0 + it) % TPB) * BT
            ptrs = Kop + blk_i * (tl.cdiv(block, 16) + 1)
            rl = tl.load(ptrs + at_i // 16, mask=ok_i, other=0)
            rh = tl.load(ptrs + tl.minimum((at_i + BT) // 16, tl.cdiv(block, 16)), mask=ok_i, other=0)
            over = tl.where(ok_i, rh - rl > KC, False)
            for k in range(0, tl.sum(over.to(tl.int32), axis=0)):
                i = tl.min(tl.where(over, it, hi), axis=0)
                m_i, l_i, accs, acc_z, acc_r = _compressed_tile(
                    m_i, l_i, accs, acc_z, acc_r, qs, qz, qb, Qg, qk_scale, tile0 + i, t_first,
                    n_valid, pos0, Kc, Ks, Kz, Ka, Kb, Kls, Kov, Koi, Kop, Vc, Vs, Vz, Va, Vb, Vls, Vov,
                    Voi, block, k_group, v_group, k2d, ok_g, cap, Mask, mrow, mask_sl,
                    DT, D, W, WP, PB, E, NF, BT, TPB, ONE_BLOCK, BITS, K_CHANNEL, V_CHANNEL, K_FOLD,
                    K_ROW_TILE, V_GROUPS, K_GROUPS, R, RP, K_OUT, CB, KC, True, VK2, OUT_UNIT, MAGIC, FP32_DOT,
                    SOFTCAP, MASK_KIND)
                over = tl.where(it == i, False, over)
    else:
        for i in tl.range(lo, hi, num_stages=STAGES):
            m_i, l_i, accs, acc_z, acc_r = _compressed_tile(
                m_i, l_i, accs, acc_z, acc_r, qs, qz, qb, Qg, qk_scale, tile0 + i, t_first, n_valid,
                pos0, Kc, Ks, Kz, Ka, Kb, Kls, Kov, Koi, Kop, Vc, Vs, Vz, Va, Vb, Vls, Vov, Voi,
                block, k_group, v_group, k2d, ok_g, cap, Mask, mrow, mask_sl,
                DT, D, W, WP, PB, E, NF, BT, TPB, ONE_BLOCK, BITS, K_CHANNEL, V_CHANNEL, K_FOLD, K_ROW_TILE,
                V_GROUPS, K_GROUPS, R, RP, K_OUT, CB, KC, False, VK2, OUT_UNIT, MAGIC, FP32_DOT, SOFTCAP,
                MASK_KIND)
    acc = join_fields(accs, GP, NF, E // NF)
    if R > 0:
        if ONE_BLOCK:
            bv = tl.load(Vb + ch[:, None] * R + r[None, :], mask=ok_c[:, None] & ok_r[None, :], other=0)
            sr = tl.load(Vls + r, mask=ok_r, other=0.0)
            acc += _mma(acc_r * sr[None, :], tl.trans(_factor(bv, MAGIC)), DT, FP32_DOT)
    return m_i, l_i, acc, acc_z
