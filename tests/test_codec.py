"""Specification of the GEAR codec below the cache container: the sparse
outliers (`outliers`), the low-rank power iteration (`lowrank`), segments
(`segment`: quantized backbone + low rank + sparse per block), and the paper's
claim about their composition: error(GEAR) < error(GEAR-L) < error(backbone),
on outlier-heavy synthetic data and on realistic K/V-like data.

Realistic K/V (`kv_like`): keys of real LLMs carry a few fixed channels about
ten times larger than the rest (KIVI, Liu et al. 2024, Fig. 2; the reason K is
quantized per channel), values have no channel structure but heavy-tailed
entries (the reason V is quantized per token and GEAR keeps sparse outliers),
and both share a coherent low-rank component across tokens (GEAR Sec. 3: the
quantization residual has fast-decaying singular values), which L captures.
"""
import dataclasses
import math

import pytest
import torch

from gear_compile import outliers
from gear_compile.store import StoreLayout
from gear_compile.config import GearConfig
from gear_compile.lowrank import power_iteration, relative_error
from gear_compile.segment import compress, decompress

from streams import streamed

FAMILIES = [(4, "kcvt"), (2, "kivi")]      # the paper's 4-bit and 2-bit backbones


# ---------------------------------------------------------------- helpers
def kv_like(heads=2, tokens=256, head_dim=64, seed=0):
    """K, V [1, heads, tokens, head_dim] with the structure described above."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(1, heads, tokens, 3, generator=g) @ torch.randn(1, heads, 3, head_dim, generator=g)
    k = torch.randn(1, heads, tokens, head_dim, generator=g) + 2 * shared
    k[..., :4] *= 8                                              # outlier channels
    torch.manual_seed(seed)
    v = torch.distributions.StudentT(3.0).sample((1, heads, tokens, head_dim)) + shared
    return k, v


def outlier_heavy(tokens=128, head_dim=64, seed=1):
    """Gaussian + 1 % spikes of size 30 + a rank-2 component: the case GEAR targets."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 2, tokens, head_dim, generator=g)
    x += torch.randn(1, 2, tokens, 2, generator=g) @ torch.randn(1, 2, 2, head_dim, generator=g)
    spikes = torch.rand(x.shape, generator=g) < 0.01
    return torch.where(spikes, 30 * torch.sign(torch.randn(x.shape, generator=g)), x)


def sqnr_db(x, y):
    err = relative_error(x, y)
    return math.inf if err == 0 else -20 * math.log10(err)


def options(method, bits, backbone):
    return dict(method=method, bits=bits, **({} if method == backbone else {"backbone": backbone}))


def segment_roundtrip(x, kind, **opts):
    layout = StoreLayout.build(GearConfig(**opts), kind, x.shape[-1], x.dtype, x.shape[2]).prefill
    return decompress(compress(x, layout), layout, None, x.dtype)


def store_roundtrip(x, kind, prefill, **opts):
    return streamed(x, GearConfig(**opts), kind, prefill).decompress()


def ordering_message(what, x, kind, results):
    lines = ", ".join(f"{m}: rel err {e:.4f} (SQNR {s:.2f} dB)" for m, (e, s) in results.items())
    return (f"{what}: expected GEAR < GEAR-L < backbone; {kind.upper()} shape {tuple(x.shape)} "
            f"dtype {x.dtype}: {lines}")


# ---------------------------------------------------------------- outliers
@pytest.mark.parametrize("ratio,length,per_side", [
    (0.02, 128, 1), (0.02, 900, 9), (0.02, 20, 0), (0.02, 64, 1), (0.1, 10, 1), (0.0, 128, 0)])
def test_outliers_per_side_is_half_the_ratio_of_the_length_rounded_half_up(ratio, length, per_side):
    assert outliers.count_per_side(ratio, length) == per_side


@pytest.mark.parametrize("length", [1, 2, 3, 10])
def test_outliers_never_take_more_than_the_vector(length):
    assert 2 * outliers.count_per_side(0.99, length) <= length


@pytest.mark.parametrize("length,dtype", [
    (20, torch.uint8), (256, torch.uint8), (257, torch.int16), (900, torch.int16),
    (32768, torch.int16), (32769, torch.int32)])
def test_outlier_index_type_is_the_narrowest_that_indexes_the_vector(length, dtype):
    assert outliers.index_dtype(length) == dtype


@pytest.mark.parametrize("block,D", [(900, 8), (20, 64), (1000, 128), (300, 300)])
def test_k_records_are_tile_csr_and_rebuild_the_table(block, D):
    """A K table as records: sorted by (token, channel), pointer j the first
    record at or past token TILE * j, and the positions and values rebuild
    the per-channel table exactly (spikes crowd 256-token boundaries)."""
    x = torch.randn(2, 3, block, D)
    x[:, :, block // 4:block // 4 + 3] *= 20
    x[:, :, -3:] *= 20
    k = max(1, block // 100)
    vals, idx = outliers.select(x, k, dim=-2)
    units = outliers.steps(vals)
    rv, rpos, rptr = outliers.records(units, idx, block)
    assert rv.shape == rpos.shape == (2, 3, 2 * k * D)
    assert rpos.dtype == (torch.int16 if D <= 256 else torch.int32) and rptr.dtype == torch.int32
    assert rptr.shape[-1] == -(-block // outliers.TILE) + 1 and rptr[..., 0].eq(0).all()
    token, ch = outliers.record_positions(rpos, rptr, D)
    key = token * D + ch
    assert (key[..., 1:] > key[..., :-1]).all()                       # sorted, no repeats
    tiles = torch.arange(rptr.shape[-1]) * outliers.TILE              # pointer j: first token >= 16 j
    assert torch.equal(rptr.long(), (token[..., None, :] < tiles[:, None]).sum(-1))
    dense = outliers.scatter_records(rv, rpos, rptr, block, D)
    assert torch.equal(dense, outliers.scatter(units, idx, x, -2))


def test_a_16_bit_record_holds_token_and_channel_above_int16():
    """(token mod 256) << 8 | channel reaches 65535: stored in an int16's bits."""
    units = torch.tensor([[[5], [-7]]], dtype=torch.int8).expand(1, 2, 256).contiguous()
    idx = torch.tensor([[[3], [255]]]).expand(1, 2, 256).contiguous()
    rv, rpos, rptr = outliers.records(units, idx, 256)
    token, ch = outliers.record_positions(rpos, rptr, 256)
    assert rpos.dtype == torch.int16 and int(rpos.min()) < 0
    assert token.tolist()[0] == [3] * 256 + [255] * 256 and ch.tolist()[0] == list(range(256)) * 2


def test_select_keeps_the_largest_and_the_smallest_in_index_order():
    x = torch.tensor([[0.5, -9.0, 3.0, 7.0, -1.0, 0.0]])
    values, idx = outliers.select(x, 2, dim=-1)
    assert values.tolist() == [[-9.0, 3.0, 7.0, -1.0]] and idx.tolist() == [[1, 2, 3, 4]]


def test_select_picks_distinct_entries_even_when_all_are_tied():
    x = torch.full((2, 8), 3.0)
    values, idx = outliers.select(x, 2, dim=-1)
    assert all(len(set(row)) == 4 for row in idx.tolist())
    assert outliers.scatter(values, idx, x, -1).ne(0).sum().item() == 8


def test_select_lists_a_k_block_tables_token_offsets_ascending_per_channel():
    """The decode kernel reads each channel's outliers as a run in token order."""
    x = torch.randn(2, 3, 300, 16)
    values, idx = outliers.select(x, 5, dim=-2)
    assert idx.dtype == torch.int16 and (idx[..., 1:, :] > idx[..., :-1, :]).all()
    assert torch.equal(values, x.gather(-2, idx.long()))


@pytest.mark.parametrize("dim", [-1, -2])
def test_scatter_puts_the_selected_values_back_in_place_and_zeros_elsewhere(dim):
    x = torch.randn(3, 10, 12)
    values, idx = outliers.select(x, 2, dim=dim)
    dense = outliers.scatter(values, idx, x, dim)
    kept = torch.zeros_like(x, dtype=torch.bool).scatter(dim, idx.long(), True)
    assert torch.equal(dense[kept], x[kept]) and dense[~kept].eq(0).all()


def test_sparse_part_keeps_spikes_out_of_the_quantization_range():
    """One spike of 1000 per token, far past what int8 steps of the token's
    range reach (SmolLM2's real K/V never come near: `outliers`): GEAR grows
    that group's step to 1000 / MAX_STEPS so the spike still fits (rebuilt
    within a step, 0.8 %: half a step from the codes, L moves it less than
    another half), and the other entries of the token keep a
    mean error 2x smaller than the backbone's, whose range the spike
    stretches to a step of 1000 / 3 (rounding them all to its minimum)."""
    x = torch.randn(1, 1, 40, 64)
    rows, cols = torch.arange(40), torch.arange(40) % 64
    x[0, 0, rows, cols] = 1000.0
    rest = torch.ones(40, 64, dtype=torch.bool)
    rest[rows, cols] = False
    err = {m: (segment_roundtrip(x, "v", method=m, bits=2, group_size=64, **extra) - x)[0, 0].abs()
           for m, extra in (("gear", {"backbone": "kivi"}), ("kivi", {}))}
    assert err["gear"][rows, cols].max() < 1000 / outliers.MAX_STEPS
    assert err["gear"][rest].mean() * 2 < err["kivi"][rest].mean(), \
        {m: e[rest].mean().item() for m, e in err.items()}


@pytest.mark.parametrize("offset", [0.0, 30.0])
def test_outliers_stretch_no_range_and_come_back_within_half_a_step(offset):
    """Spikes of 20 over the token's values (4 bits), which sit around 0 or
    around 30 (an offset channel group, where a zeroed outlier would stretch
    the range down to 0): each token's step is that of its values without its
    two outliers, and every outlier is rebuilt within half of it."""
    x = torch.randn(1, 1, 40, 64) + offset
    spikes = torch.arange(40), torch.arange(40) % 64
    x[0, 0, spikes[0], spikes[1]] = 20.0 + offset
    layout = StoreLayout.build(GearConfig(method="gear", bits=4, backbone="kivi", group_size=64), "v",
                               64, x.dtype, 40).prefill
    layout = dataclasses.replace(layout, rank=0)
    seg = compress(x, layout)
    _, idx = outliers.select(x, layout.outliers_per_side, -1)
    kept = torch.ones_like(x, dtype=torch.bool).scatter(-1, idx.long(), False)
    spread = torch.where(kept, x, -torch.inf).amax(-1) - torch.where(kept, x, torch.inf).amin(-1)
    assert seg.out_val.dtype == torch.int8 and seg.out_val.abs().max() < outliers.MAX_STEPS
    assert torch.allclose(seg.scale.float().squeeze(-1), spread / 15, rtol=1e-2)   # fp16 scale and zero
    err = (decompress(seg, layout, None, torch.float32) - x).abs()
    assert (err.gather(-1, idx.long()) <= seg.scale.float() / 2 + 1e-3).all()


# ---------------------------------------------------------------- low rank
def test_power_iteration_recovers_an_exactly_low_rank_matrix():
    r = torch.randn(3, 40, 2) @ torch.randn(3, 2, 16)
    a, b = power_iteration(r, rank=2, iters=4)
    assert relative_error(r, a @ b.transpose(-1, -2)) < 1e-4


def test_power_iteration_a_factor_is_orthonormal():
    a, _ = power_iteration(torch.randn(2, 50, 16), rank=4, iters=3)
    eye = torch.eye(4).expand(2, 4, 4)
    assert torch.allclose(a.transpose(-1, -2) @ a, eye, atol=1e-5)


def test_power_iteration_is_within_a_percent_of_the_best_rank_r_error():
    u, _ = torch.linalg.qr(torch.randn(60, 60))
    w, _ = torch.linalg.qr(torch.randn(32, 32))
    s = 0.5 ** torch.arange(32.0)                       # fast-decaying spectrum, as GEAR's residual
    r = u[:, :32] @ torch.diag(s) @ w.T
    a, b = power_iteration(r, rank=3, iters=3)
    best = s[3:].norm() / s.norm()
    assert relative_error(r, a @ b.T) <= best * 1.01


def test_rank_beyond_the_matrix_leaves_zero_columns():
    a, b = power_iteration(torch.randn(3, 2), rank=4, iters=2)
    assert a.shape == (3, 4) and b.shape == (2, 4)
    assert (a[:, 2:] == 0).all() and (b[:, 2:] == 0).all()


def test_power_iteration_is_deterministic_without_rng_state():
    r = torch.randn(2, 30, 16)
    torch.manual_seed(123)
    first = power_iteration(r, 2, 3)
    torch.manual_seed(456)
    second = power_iteration(r, 2, 3)
    assert all(torch.equal(p, q) for p, q in zip(first, second))


# ---------------------------------------------------------------- segments
@pytest.mark.parametrize("method", ["gear", "gear_l", "kcvt", "kivi", "per_token", "none"])
@pytest.mark.parametrize("kind", ["k", "v"])
def test_segment_parts_have_the_layout_shapes_and_dtypes(method, kind):
    config = GearConfig(method=method, bits=2 if method == "kivi" else 4, group_size=16,
                        outlier_ratio=0.1 if method == "gear" else None)
    layout = StoreLayout.build(config, kind, 32, torch.float16, 0).decode     # decode layout, n_b blocks
    x = torch.randn(2, 3, 2 * layout.block, 32, dtype=torch.float16)
    seg = compress(x, layout)
    expected = layout.shapes(2, 3, 2 * layout.block)
    assert set(seg.parts()) == set(expected) == set(layout.part_names)
    for name, t in seg.parts().items():
        assert (tuple(t.shape), t.dtype) == (tuple(expected[name][0]), expected[name][1]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_method_none_stores_the_input_exactly(dtype):
    x = torch.randn(1, 2, 10, 16).to(dtype)
    assert torch.equal(segment_roundtrip(x, "k", method="none"), x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["k", "v"])
def test_segment_reconstructs_in_the_input_dtype_within_the_backbone_half_step(dtype, kind):
    x = torch.randn(1, 2, 30, 16).to(dtype)
    config = GearConfig(method="kcvt", bits=4)
    layout = StoreLayout.build(config, kind, 16, dtype, 30).prefill
    seg = compress(x, layout)
    y = decompress(seg, layout, None, dtype)
    assert y.dtype == dtype and y.shape == x.shape
    step = seg.scale.float()     # [1, 2, 1, 16] per channel (K) or [1, 2, 30, 1] per token (V)
    rounding = torch.finfo(dtype).eps * x.float().abs() if dtype != torch.float32 else 0
    assert ((y.float() - x.float()).abs() <= step / 2 + rounding + 1e-6).all(), f"{kind} {dtype}"


def test_per_token_groups_must_divide_the_head_dim():
    layout = StoreLayout.build(GearConfig(method="per_token", group_size=6), "v", 16, torch.float32, 4).prefill
    with pytest.raises(ValueError, match="group_size 6 does not divide head_dim 16"):
        compress(torch.randn(1, 1, 4, 16), layout)


# ---------------------------------------------------------------- non-finite input
@pytest.mark.parametrize("kind", ["k", "v"])
def test_check_finite_names_the_count_and_first_index_of_non_finite_values(kind):
    x = torch.randn(1, 2, 8, 16)
    x[0, 1, 3, 5] = torch.nan
    x[0, 1, 6, 2] = torch.inf
    layout = StoreLayout.build(GearConfig(method="gear"), kind, 16, torch.float32, 8).prefill
    with pytest.raises(ValueError, match=r"2 non-finite value\(s\), first at index \(0, 1, 3, 5\)"):
        compress(x, layout, check_finite=True)


def test_check_finite_refuses_values_beyond_the_fp16_range():
    x = torch.randn(1, 1, 4, 16)
    x[0, 0, 0, 0] = 1e6
    layout = StoreLayout.build(GearConfig(method="kcvt"), "k", 16, torch.float32, 4).prefill
    with pytest.raises(ValueError, match="beyond the fp16 range"):
        compress(x, layout, check_finite=True)


@pytest.mark.parametrize("method", ["kcvt", "gear_l", "gear"])
@pytest.mark.parametrize("kind", ["k", "v"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_without_check_finite_a_non_finite_value_stays_in_its_own_vector(method, kind, bad):
    """The entry reconstructs non-finite; every vector that does not hold it
    (other channels of the block for K, other tokens for V) stays finite."""
    x = torch.randn(1, 1, 20, 16)
    x[0, 0, 3, 5] = bad
    y = segment_roundtrip(x, kind, method=method, bits=4, outlier_ratio=0.1 if method == "gear" else None)
    assert not torch.isfinite(y[0, 0, 3, 5])
    others = torch.ones(20, 16, dtype=torch.bool)
    if kind == "k":
        others[:, 5] = False
    else:
        others[3, :] = False
    assert torch.isfinite(y[0, 0][others]).all(), f"{method} {kind}: non-finite leaked out of its vector"


def test_without_check_finite_a_backbone_vector_holding_nan_reconstructs_as_nan():
    x = torch.randn(1, 1, 8, 16)
    x[0, 0, 3, 5] = torch.nan
    y = segment_roundtrip(x, "v", method="kcvt", bits=4)
    assert torch.isnan(y[0, 0, 3]).all()


# ---------------------------------------------------------------- compositions
@pytest.mark.parametrize("bits,backbone", FAMILIES)
@pytest.mark.parametrize("kind", ["k", "v"])
def test_gear_beats_gear_l_beats_backbone_on_outlier_heavy_data(bits, backbone, kind):
    x = outlier_heavy()
    results = {}
    for method in ("gear", "gear_l", backbone):
        y = segment_roundtrip(x, kind, **options(method, bits, backbone))
        results[method] = (relative_error(x, y), sqnr_db(x, y))
    e = {m: r[0] for m, r in results.items()}
    assert e["gear"] < e["gear_l"] < e[backbone], ordering_message(
        f"outlier-heavy, {backbone}-{bits}", x, kind, results)


@pytest.mark.parametrize("bits,backbone", FAMILIES)
@pytest.mark.parametrize("kind", ["k", "v"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gear_beats_gear_l_beats_backbone_on_realistic_kv_through_the_cache(bits, backbone, kind, dtype):
    """Prefill 192 tokens, then 64 decode tokens appended one at a time, so the
    prefill block (r_p = 4), decode blocks (r_g = 2) and the buffer all count;
    an fp16 model's K/V and an fp32 model's (whose buffer is held in fp16)."""
    k, v = kv_like()
    x = (k if kind == "k" else v).to(dtype)
    results = {}
    for method in ("gear", "gear_l", backbone):
        y = store_roundtrip(x, kind, 192, **options(method, bits, backbone))
        results[method] = (relative_error(x, y), sqnr_db(x, y))
    e = {m: r[0] for m, r in results.items()}
    assert e["gear"] < e["gear_l"] < e[backbone], ordering_message(
        f"realistic K/V, {backbone}-{bits}, n_b default", x, kind, results)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_more_bits_give_a_smaller_gear_error(bits):
    k, _ = kv_like(tokens=64)
    errors = {b: relative_error(k, segment_roundtrip(k, "k", method="gear", bits=b, backbone="kivi"))
              for b in (2, 4, 8)}
    assert errors[2] > errors[4] > errors[8], errors
