"""Dequantization in the Triton decode kernels: codes and stats as dot operands (issue 28, item 2).

Job: a compressed tile's codes as NF tensor-core operands (one per bit
field, or all at once), their (scale, zero) at the same places, and the
query / output tiles split and joined to match. `decode_tiles` (the tile
loops) and `lorc_decode` read the codes through here; `packing` owns the
layout (byte j of a token row holds, in its bit field f, channel f * W + j,
so the extended axis e = f * WP + j).

Fp16 queries (MAGIC): a code becomes fp16 with no conversion instruction.
(c | 0x6400) read as fp16 is 1024 + c exactly (fp16 has 10 mantissa bits);
minus 1024 it is c, and x = c * s + z is one fp16 FMA, packed two a
instruction. Chosen over an int8 / fp16 tl.dot per bit plane (a second dot
per plane) and over inline asm (the interpreter runs the same code). bf16 and
fp32 queries keep int32 -> fp32 -> the dot's dtype (I2F + F2F, 2 a code): an
fp16 FMA could overflow a bf16 model's range.

One operand per bit field (NF = PB, `decode_tiles.compressed_pass`): the
field is masked where it lies, with no shift, so the value read is 1024 +
c 2^(f BITS), still exact (c 2^(f BITS) < 2^8); times 2^-(f BITS) minus 1024
2^-(f BITS) (powers of two: exact) it is c, one packed FMA. Each field feeds
its own tl.dot over the byte axis (K: the reduction, WP deep; V: WP output
columns), so the byte tile keeps the shape it was loaded in, Triton loads it
from shared memory straight into the dot-operand layout (ldmatrix) and the
fields unpack in registers. Unpacked at once into [BT, E] (`codes_tile`, NF
= 1), the reshape of [BT, PB, WP] went through shared memory, a byte and
then a half at a time. sm_90a, d 128, the main loop's SASS lines a thread
(results/kernel_sass_sm90.md): KIVI-2 (64-token tile, 4 warps) 1,650 ->
950 with the mask change in `decode_tiles._finish_scores`, KCVT-4 (8 warps)
861 -> 439. NF is PB (2 or 4) for fp16 queries when a field is at least 16
wide (tl.dot's smallest K / N) and the store has no V outliers; else 1.
"""
import triton
import triton.language as tl

# Conversion instructions a code costs in the main loop, as the dequantization above chose them
# (issue 28, item 2), by MAGIC: none for fp16 queries, int32 -> fp32 -> the dot's dtype (I2F +
# F2F) otherwise. tests/test_kernel_sm90_build.py holds the sm_90a SASS to these.
CONVERSIONS_PER_CODE = {True: 0.0, False: 2.0}


@triton.jit
def field_channels(F: tl.constexpr, FW: tl.constexpr, W: tl.constexpr, WP: tl.constexpr,
                   D: tl.constexpr):
    """The channels of the extended places [F * FW, (F + 1) * FW), and which hold one."""
    e = F * FW + tl.arange(0, FW)
    ch = (e // WP) * W + e % WP
    return ch, (e % WP < W) & (ch < D)


@triton.jit
def _code_bytes(codes, t, ok_t, W: tl.constexpr, WP: tl.constexpr):
    """Tokens t's code bytes [BT, WP], 0 past a row's W bytes and for dead tokens."""
    j = tl.arange(0, WP)
    return tl.load(codes + t[:, None] * W + j[None, :], mask=ok_t[:, None] & (j < W)[None, :], other=0)


@triton.jit
def magic_fields(codes, t, ok_t, W: tl.constexpr, WP: tl.constexpr, BT: tl.constexpr,
                 BITS: tl.constexpr, NF: tl.constexpr):
    """The NF bit fields of tokens t's code bytes, each [BT, WP] fp16, exact."""
    byte = _code_bytes(codes, t, ok_t, W, WP)
    out = ()
    for F in tl.static_range(NF):
        x = ((byte & (((1 << BITS) - 1) << (F * BITS))).to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True)
        out = out + (x * (1.0 / (1 << (F * BITS))) - (1024.0 / (1 << (F * BITS))),)
    return out


@triton.jit
def split_fields(x, GP: tl.constexpr, NF: tl.constexpr, FW: tl.constexpr):
    """[GP, NF * FW] as NF tiles [GP, FW], column block F the F-th."""
    if NF == 1:
        out = (x,)
    elif NF == 2:
        a, b = tl.split(tl.permute(tl.reshape(x, (GP, 2, FW)), (0, 2, 1)))
        out = (a, b)
    else:   # 4: F = 2 F1 + F0, the last axis split first
        x0, x1 = tl.split(tl.permute(tl.reshape(x, (GP, 2, 2, FW)), (0, 3, 2, 1)))
        f0, f1 = tl.split(x0)
        f2, f3 = tl.split(x1)
        out = (f0, f1, f2, f3)
    return out


@triton.jit
def join_fields(xs, GP: tl.constexpr, NF: tl.constexpr, FW: tl.constexpr):
    """`split_fields`' inverse: NF tiles [GP, FW] side by side, [GP, NF * FW]."""
    if NF == 1:
        x = xs[0]
    elif NF == 2:
        x = tl.reshape(tl.permute(tl.join(xs[0], xs[1]), (0, 2, 1)), (GP, 2 * FW))
    else:
        x = tl.join(tl.join(xs[0], xs[1]), tl.join(xs[2], xs[3]))
        x = tl.reshape(tl.permute(x, (0, 3, 2, 1)), (GP, 4 * FW))
    return x


@triton.jit
def codes_tile(codes, t, ok_t, W: tl.constexpr, WP: tl.constexpr, PB: tl.constexpr,
                E: tl.constexpr, BT: tl.constexpr, BITS: tl.constexpr, MAGIC: tl.constexpr):
    """Unpacked codes [BT, E] of tokens t (fp16 with MAGIC, else fp32): every
    bit field of a byte tile at once, flattened onto the extended channel axis."""
    byte = _code_bytes(codes, t, ok_t, W, WP)
    if MAGIC:
        shift = (tl.arange(0, PB) * BITS).to(tl.uint16)
        fields = (byte.to(tl.uint16)[:, None, :] >> shift[None, :, None]) & ((1 << BITS) - 1)
        x = (fields | 0x6400).to(tl.float16, bitcast=True) - 1024.0
    else:
        shift = tl.arange(0, PB) * BITS
        x = ((byte.to(tl.int32)[:, None, :] >> shift[None, :, None]) & ((1 << BITS) - 1)).to(tl.float32)
    return tl.reshape(x, (BT, E))


@triton.jit
def code_operands(codes, t, ok_t, W: tl.constexpr, WP: tl.constexpr, PB: tl.constexpr, E: tl.constexpr,
                   NF: tl.constexpr, BT: tl.constexpr, BITS: tl.constexpr, MAGIC: tl.constexpr):
    """Tokens t's codes as NF dot operands: the bit fields [BT, WP] each
    (`decode_fields`), or (NF 1) every field at once, [BT, E]."""
    if NF == 1:
        cs = (codes_tile(codes, t, ok_t, W, WP, PB, E, BT, BITS, MAGIC),)
    else:
        cs = magic_fields(codes, t, ok_t, W, WP, BT, BITS, NF)
    return cs


@triton.jit
def stats(scale, zero, t0, t, ok_t, ch, ok_c, group, D: tl.constexpr, AXIS_CHANNEL: tl.constexpr,
           ROW_TILE: tl.constexpr, MAGIC: tl.constexpr):
    """(scale, zero) of the tile's places, [BT, E] or, with ROW_TILE (the
    tile, first token t0, inside one channel-axis row), the row [1, E]: fp16
    with MAGIC."""
    if AXIS_CHANNEL:   # one (scale, zero) per channel per `group` tokens
        if ROW_TILE:
            sidx = (t0 // group) * D + ch[None, :]
            ok = ok_c[None, :]
        else:
            sidx = (t // group)[:, None] * D + ch[None, :]
            ok = ok_t[:, None] & ok_c[None, :]
    else:              # one (scale, zero) per token per `group` channels
        sidx = t[:, None] * (D // group) + (ch // group)[None, :]
        ok = ok_t[:, None] & ok_c[None, :]
    s = tl.load(scale + sidx, mask=ok, other=0.0)
    z = tl.load(zero + sidx, mask=ok, other=0.0)
    if not MAGIC:
        s = s.to(tl.float32)
        z = z.to(tl.float32)
    return s, z


@triton.jit
def token_group_stats(scale, zero, t, ok_t, BT: tl.constexpr, D: tl.constexpr, NG: tl.constexpr,
                       MAGIC: tl.constexpr):
    """(scale, zero) [BT, D] of a per-token store with NG channel groups a
    token: BT x NG pairs loaded (`stats` loads one a place), each broadcast
    over its D / NG channels (a reshape Triton lowers through shared memory,
    cheaper than the places' loads: results/kernel_sass_sm90.md)."""
    sidx = t[:, None] * NG + tl.arange(0, NG)[None, :]
    s = tl.load(scale + sidx, mask=ok_t[:, None], other=0.0)
    z = tl.load(zero + sidx, mask=ok_t[:, None], other=0.0)
    if not MAGIC:
        s = s.to(tl.float32)
        z = z.to(tl.float32)
    s = tl.reshape(tl.broadcast_to(s[:, :, None], (BT, NG, D // NG)), (BT, D))
    z = tl.reshape(tl.broadcast_to(z[:, :, None], (BT, NG, D // NG)), (BT, D))
    return s, z


@triton.jit
def token_pairs(scale, zero, t, ok_t, NG: tl.constexpr):
    """Tokens t's (scale, zero) [BT] of each of their NG channel groups, as
    held (a bit field inside one group applies its pair where it lies)."""
    pairs = ()
    for gi in tl.static_range(NG):
        pairs = pairs + ((tl.load(scale + t * NG + gi, mask=ok_t, other=0.0),
                          tl.load(zero + t * NG + gi, mask=ok_t, other=0.0)),)
    return pairs
