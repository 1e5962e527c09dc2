"""Codes as tensor-core operands one bit field at a time (issue 28, item 2).

Job: a compressed tile's codes as NF dot operands, and the query / output
tiles split and joined to match. `decode_tiles` reads the codes through
here; `packing` owns the layout (byte j of a token row holds, in its bit
field f, channel f * W + j, so the extended axis e = f * WP + j).

Why fields. With fp16 queries (MAGIC) a field of a byte tile [BT, WP] becomes
fp16 where it lies, with no shift: the field masked in place, or'ed into
fp16 1024's bits and read as fp16, is 1024 + c 2^(f BITS) exactly (c 2^(f
BITS) < 2^8 sits inside fp16's 10 mantissa bits); times 2^-(f BITS) minus
1024 2^-(f BITS) (one packed FMA; both values powers of two, every step
exact) it is c. Each field then feeds its own tl.dot over the byte axis
(K: K dim WP; V: N dim WP), so the tile keeps the shape it was loaded in and
Triton loads the bytes from shared memory straight into the dot-operand
layout (ldmatrix) and unpacks them in registers. Unpacked all at once into
[BT, E] instead (`decode_tiles._codes_tile`, NF = 1), the reshape of
[BT, PB, WP] went through shared memory, a byte and then a half at a time.
sm_90a, KIVI-2 d 128, 64-token tile, 4 warps (results/kernel_sass_sm90.md):
the main loop's SASS fell from 1,650 to the figure recorded there.

NF (`decode_tiles.compressed_pass`) is PB with fp16 queries when each field is at least 16
wide (tl.dot's smallest K / N), else 1: bf16 and fp32 queries keep the
int -> float path and the one [BT, E] tile.
"""
import triton
import triton.language as tl


@triton.jit
def field_channels(F: tl.constexpr, FW: tl.constexpr, W: tl.constexpr, WP: tl.constexpr,
                   D: tl.constexpr):
    """The channels of the extended places [F * FW, (F + 1) * FW), and which hold one."""
    e = F * FW + tl.arange(0, FW)
    ch = (e // WP) * W + e % WP
    return ch, (e % WP < W) & (ch < D)


@triton.jit
def magic_fields(codes, t, ok_t, W: tl.constexpr, WP: tl.constexpr, BT: tl.constexpr,
                 BITS: tl.constexpr, NF: tl.constexpr):
    """The NF bit fields of tokens t's code bytes, each [BT, WP] fp16, exact."""
    j = tl.arange(0, WP)
    byte = tl.load(codes + t[:, None] * W + j[None, :], mask=ok_t[:, None] & (j < W)[None, :], other=0)
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
