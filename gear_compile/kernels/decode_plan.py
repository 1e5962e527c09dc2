"""The host side of the Triton decode attention: what to launch, decided from static shapes.

Job: from a layer's K/V `StoreLayout`s and the call's shapes, the kernel's
constexprs and runtime scalars (`plan`), the split count (`num_splits`) and
the autotuner's tile configurations (`TILE_CONFIGS`, `prune_tile_configs`).
Nothing here reads a tensor's values: the live lengths stay on the device,
so one compiled graph / CUDA graph serves every decode step. Neighbours:
`decode_attention` (the kernel and the launcher that use this),
`decode_tiles` (the inner loops), `store` / `segment` (the layouts).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton

from .. import outliers
from ..packing import packed_width
from ..segment import SegmentLayout
from ..store import StoreLayout


def pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _tile_for(tokens: int, largest: int = 128) -> int:
    """A tile of >= `tokens` tokens (16 .. largest, a power of two: tl.dot's
    smallest width up to the autotuned prefill tile's largest)."""
    return min(largest, max(16, pow2(tokens)))


# ---- the autotuner's configurations ---------------------------------------

@dataclass(frozen=True)
class TileConfig:
    """Tokens per prefill tile, warps, and pipeline stages of the main loops."""

    tile: int
    warps: int
    stages: int


TILE_CONFIGS = tuple(TileConfig(bt, w, s) for bt in (32, 64, 128) for w in (4, 8) for s in (3, 4))
DEFAULT_TILE_CONFIG = TileConfig(64, 8, 3)   # where nothing is autotuned (the interpreter)
# Pruning model (issue 28 item 5; item 6's SASS counts refine it): a config
# stays if (1) the dequantized K tile, BT x E values, gives each thread
# between 8 and 64 of them: above 64 the K and V tiles, the fp32 outlier
# tile and the accumulator no longer fit 255 registers without spilling;
# below 8 a warp's loads are too few to cover DRAM latency; and (2) its
# stages' shared memory (K and V bytes of a tile, low-rank A rows, fp16
# scores) fits SMEM_BUDGET. With outliers (GEAR's K records and V's
# per-token channels) at most OUTLIER_VALUES_PER_THREAD: the record window's
# one-hot products and V's selects take the rest (sm_90a, fp16, GEAR-2 and
# GEAR-4 at d 64 and 128, 3 stages: every config at 16 values a thread or
# fewer builds with no stack, every one at 32 or more spills, 8-2584 bytes;
# benchmarks/results/kernel_sass_sm90.md).
VALUES_PER_THREAD = (8, 64)
OUTLIER_VALUES_PER_THREAD = 16
SMEM_BUDGET = 160 * 1024


def stage_bytes(tile: int, D: int, bits: int, rank: int) -> int:
    """Bytes one pipeline stage holds: a tile of K and of V (codes or exact
    fp16 values) and of their low-rank A rows."""
    row = 2 * D if bits == 16 else packed_width(D, bits)
    return tile * 2 * (row + rank)


def prune_tile_configs(configs, E: int, D: int, bits: int, rank: int,
                       outliers: bool = False) -> list[TileConfig]:
    """The configs that the pruning model above keeps (at least the default)."""
    lo, hi = VALUES_PER_THREAD
    if outliers:
        hi = OUTLIER_VALUES_PER_THREAD
    kept = [c for c in configs if lo <= c.tile * E / (32 * c.warps) <= hi
            and c.stages * stage_bytes(c.tile, D, bits, rank) <= SMEM_BUDGET]
    return kept or [DEFAULT_TILE_CONFIG]


# ---- the split over programs ------------------------------------------------

PROGRAMS_PER_SM = 2        # programs an SM holds at once (registers / shared memory of 4-8 warps)
MIN_TILES_PER_SPLIT = 4    # a program's loop needs a few tiles for its pipeline to fill
MAX_SPLITS = 128
WAVE_EFFICIENCY = 0.85     # FlashAttention-2's rule: the fewest splits within 85 % of the best


def num_splits(programs: int, tiles: int, sms: int) -> int:
    """Splits of each (batch, KV head)'s work list: FlashAttention-2's
    wave-efficiency rule over `programs` (batch x KV heads) on `sms` SMs
    holding PROGRAMS_PER_SM each, with at least MIN_TILES_PER_SPLIT of the
    static `tiles` per split."""
    slots = sms * PROGRAMS_PER_SM
    most = max(1, min(MAX_SPLITS, tiles // MIN_TILES_PER_SPLIT))

    def efficiency(s):
        waves = programs * s / slots
        return waves / math.ceil(waves)
    best = max(efficiency(s) for s in range(1, most + 1))
    return next(s for s in range(1, most + 1) if efficiency(s) >= WAVE_EFFICIENCY * best)


# ---- constexprs and scalars --------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """What one launch passes besides the tensors: runtime ints and
    constexprs by kernel argument name (the tile config apart), and the
    static tiles of its work list (for the split count)."""

    scalars: dict
    consts: dict
    tiles: int


RECORD_MARGIN = 1.5   # a K tile's record window: this many times the block's mean records per tile
RECORD_CHUNK = 64     # the smallest window: the records `decode_tiles` puts in one one-hot product


def record_window(layout: SegmentLayout, tile: int) -> int:
    """K outlier records a tile of `tile` tokens reads in one window (a power
    of two; 0 without K outliers): a tile that is its whole block holds
    exactly the block's 2k * D; otherwise RECORD_MARGIN times the block's
    mean per tile (for the prefill block, per token, `tile` 1: the kernel
    multiplies by its autotuned tile). A tile holding more is read by the
    kernel's overflow programs (`overflow_programs`)."""
    k2d = 2 * layout.outliers_per_side * layout.head_dim
    if not k2d:
        return 0
    if tile >= layout.block:
        return max(RECORD_CHUNK, pow2(k2d))
    return pow2(math.ceil(RECORD_MARGIN * k2d * tile / layout.block))


def has_outliers(consts: dict) -> bool:
    """Whether a launch of these constexprs reads outliers (K records or V's)."""
    return bool(consts["P_K_OUT"] or consts["D_K_OUT"] or consts["VK2"])


def representative(configs) -> TileConfig:
    """The one config of a pruned list that the default sm_90a checks build:
    the default if kept, else the kept one of its warps and stages with the
    largest tile, else the first."""
    d = DEFAULT_TILE_CONFIG
    if d in configs:
        return d
    same = [c for c in configs if (c.warps, c.stages) == (d.warps, d.stages)]
    return max(same, key=lambda c: c.tile) if same else configs[0]


def overflow_programs(consts: dict) -> bool:
    """Whether a launch of these constexprs has overflow programs (programs S..
    2S - 1 read the tiles of ranges 0.. S - 1 whose K records overflow their
    window): with K records in the prefill block, or in decode blocks split
    into several tiles (a tile that is its whole block reads all its records)."""
    return consts["P_K_OUT"] or (consts["D_K_OUT"] and consts["D_TPB"] > 1)


def rank_width(gp: int, rank: int, tensor_cores: bool) -> int:
    """The low-rank axis: a power of two >= 16 (tl.dot's smallest K), and
    with tensor cores wider than the GP query rows. Triton's mma-v2 layout
    for a chain of tl.dots (AccelerateMatmul's warpsPerTileV2) gives the
    whole chain the warps of the first dot it lays out, all on the M axis
    when that dot's M >= N: one [GP, GP] rank-space dot would make every
    warp compute every tile's scores, values and accumulator (sm_90a,
    GEAR-L-4 d 128, 64-token tile, 8 warps: 9x the tensor-core ops, 255
    registers and a 168-byte spill; padded: 231, none). FMA products
    (tensor_cores false) need no padding; every compiled product now runs
    on tensor cores, fp32 ones as 3xTF32 (`decode_tiles._mma`). The
    padding's columns are masked zeros: the results are the same."""
    return max(2 * gp if tensor_cores else 16, pow2(rank))


def _group(layout: SegmentLayout) -> int:
    return layout.token_group if layout.spec.axis == "channel" else layout.channel_group


def _token_groups(pv: SegmentLayout, dv: SegmentLayout, D: int, E: int) -> int:
    """A per-token side's (scale, zero) pairs per token as the tile reads
    them (`V_GROUPS` for V, `K_GROUPS` for K): for V, 1, one a token (KCVT,
    GEAR), folded into p (p s . c + p . z); n > 1, n channel groups a token
    (KIVI at a head dim above its group), each token's n pairs loaded once,
    for a bit field inside one group (`decode_fields`) or broadcast over their
    channels, which needs the tile's E places to be D, a power-of-two group,
    and the registers of a store with no outliers or rank (GEAR-2's KIVI
    backbone spilled with it: results/kernel_sass_sm90.md); 0, gathered at
    each (token, channel) place (a per-channel side, or any other grouping).
    K reads n only for its bit fields (per_token's K)."""
    if dv.spec.axis != "token" or _group(pv) != _group(dv):
        return 0
    group = _group(dv)
    if group == D:
        return 1
    plain = not (pv.rank or dv.rank or pv.outliers_per_side or dv.outliers_per_side)
    return D // group if plain and E == D and D % group == 0 and group == pow2(group) else 0


def plan(kl: StoreLayout, vl: StoreLayout, *, q_dtype: torch.dtype, heads: int, kv_heads: int,
         prefill_tokens: int, decode_tokens: int, sink_tokens: int, buffer_tokens: int,
         new_tokens: int, mask_kind: int, softcap: float, interpret: bool) -> Plan:
    """The launch of one decode attention over stores of layouts kl / vl
    holding a prefill block of `prefill_tokens` (0: none), a decode capacity
    of `decode_tokens`, `sink_tokens` exact sinks and a `buffer_tokens`
    buffer, plus `new_tokens` of the call."""
    D = kl.head_dim
    pk, pv, dk, dv = kl.prefill, vl.prefill, kl.decode, vl.decode
    exact = dk.exact
    G = heads // kv_heads
    gp = max(16, pow2(G))      # query rows of a tile: tl.dot's smallest M
    if exact:
        bits, w, pb, wp = 16, D, 1, max(16, pow2(D))
    else:
        bits = dk.spec.bits
        w, pb = packed_width(D, bits), 8 // bits
        wp = max(pow2(w), 16 // pb)
    k_channel = not exact and dk.spec.axis == "channel"
    d_block = dk.block
    dbt = _tile_for(d_block)
    fp32_dot = q_dtype == torch.float32 or (q_dtype == torch.bfloat16 and interpret)
    consts = dict(
        G=G, GP=gp, D=D, W=w, WP=wp, PB=pb, E=pb * wp, BITS=0 if exact else bits,
        STORE_EXACT=exact, K_CHANNEL=k_channel, V_CHANNEL=not exact and dv.spec.axis == "channel",
        # KIVI's token groups inside the prefill block (0: one group per block, KCVT)
        K_GROUP=(pk.spec.group or 0) if k_channel else 0,
        P_R=pk.rank, D_R=dk.rank, RP=rank_width(gp, max(pk.rank, dk.rank), tensor_cores=True),
        P_K_FOLD=k_channel and not pk.spec.group,
        D_K_ROW_TILE=k_channel and (_group(dk) == d_block or (_group(dk) % dbt == 0 and d_block % dbt == 0)),
        V_GROUPS=_token_groups(pv, dv, D, pb * wp) if not exact else 0,
        K_GROUPS=_token_groups(pk, dk, D, pb * wp) if not exact else 0,
        P_K_OUT=pk.outliers_per_side > 0, D_K_OUT=dk.outliers_per_side > 0, CB=outliers.channel_bits(D),
        P_KRPT=record_window(pk, 1), D_KC=record_window(dk, dbt), VK2=2 * dv.outliers_per_side,
        OUT_UNIT=outliers.unit(bits) if not exact else 1.0,
        MAGIC=not exact and q_dtype == torch.float16, FP32_DOT=fp32_dot,
        SOFTCAP=softcap > 0, MASK_KIND=mask_kind,
        SBT=_tile_for(sink_tokens), DBT=dbt, D_TPB=triton.cdiv(d_block, dbt),
        XBT=_tile_for(buffer_tokens), NBT=_tile_for(new_tokens, 64))
    scalars = dict(
        P_CAP=prefill_tokens, D_CAP=decode_tokens, d_block=d_block, BUF_CAP=buffer_tokens,
        N_SINK=sink_tokens, T_NEW=new_tokens,
        pk_group=_group(pk) if not exact else 1, pv_group=_group(pv) if not exact else 1,
        dk_group=_group(dk) if not exact else 1,
        dv_group=_group(dv) if not exact else 1,
        pk_k2=2 * pk.outliers_per_side, dk_k2=2 * dk.outliers_per_side)
    tiles = (triton.cdiv(sink_tokens, consts["SBT"]) + triton.cdiv(prefill_tokens, 64)
             + decode_tokens // d_block * consts["D_TPB"] + triton.cdiv(buffer_tokens, consts["XBT"])
             + triton.cdiv(new_tokens, consts["NBT"]))
    return Plan(scalars, consts, tiles)

