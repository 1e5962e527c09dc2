"""The GEAR codec as a specification: packing, the quantizer's error bound,
outliers, low rank, the compositions' error ordering, the streaming container,
kv_bytes by hand count, dtypes and non-finite input."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from gear_compile import packing
from gear_compile.compressed_kv import CompressedKV
from gear_compile.store import KVStore
from gear_compile.config import GearConfig
from gear_compile.lowrank import power_iteration, relative_error
from gear_compile.quantize import quantize
from gear_compile.segment import SegmentLayout, compress, dequantize


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("head_dim", [1, 3, 8, 63, 64, 65, 127, 128])
def test_pack_then_unpack_is_identity(bits, head_dim):
    codes = torch.randint(0, 2 ** bits, (2, 3, 5, head_dim), dtype=torch.uint8)
    packed = packing.pack(codes, bits)
    assert packed.shape[-1] == -(-head_dim * bits // 8)
    assert torch.equal(packing.unpack(packed, bits, head_dim), codes)


def test_packing_is_planar_two_bit_fields_hold_channels_w_apart():
    codes = torch.tensor([[0, 1, 2, 3, 3, 2, 1, 0]], dtype=torch.uint8)   # W = 2
    packed = packing.pack(codes, 2)
    # byte 0 = channels 0, 2, 4, 6; byte 1 = channels 1, 3, 5, 7 (low to high bits)
    assert packed.tolist() == [[0 | 2 << 2 | 3 << 4 | 1 << 6, 1 | 3 << 2 | 2 << 4 | 0 << 6]]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantization_error_is_within_half_a_step(bits, dtype):
    x = (torch.randn(4, 6, 64) * 3 + 1).to(dtype)
    codes, scale, zero = quantize(x, bits, dim=-1)
    rebuilt = codes.float() * scale.float() + zero.float()
    err = (rebuilt - x.float()).abs()
    bound = scale.float() / 2 * (1 + 1e-6) + 1e-7
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():g} at bits={bits} {dtype}"


@pytest.mark.parametrize("value", [0.3, -2.5, 0.0, 1e-3, 0.25])
def test_constant_vector_reconstructs_exactly_or_within_a_sub_ulp_step(value):
    x = torch.full((1, 1, 4, 16), value)
    layout = SegmentLayout(GearConfig(method="kcvt").value_spec(), "v", 4, 0, 0, 16, torch.float32)
    seg = compress(x, layout)
    y = dequantize(seg, layout, None, x.dtype)
    if torch.tensor(value).half().float().item() == value:      # fp16-representable: exact
        assert torch.equal(y, x) and (seg.scale == 0).all()
    else:                               # zero rounded down, scale spans the fp16 rounding gap
        ulp = (torch.nextafter(torch.tensor(value).half(), torch.tensor(torch.inf).half()).float()
               - torch.tensor(value).half().float()).abs()
        assert ((y - x).abs() <= ulp / 15).all()


def test_non_finite_input_raises_with_check_finite_and_propagates_nan_otherwise():
    x = torch.randn(1, 1, 8, 16)
    x[0, 0, 3, 5] = torch.nan
    layout = SegmentLayout(GearConfig(method="kcvt").value_spec(), "v", 8, 0, 0, 16, torch.float32)
    with pytest.raises(ValueError, match=r"1 non-finite value\(s\), first at index \(0, 0, 3, 5\)"):
        compress(x, layout, check_finite=True)
    y = dequantize(compress(x, layout), layout, None, x.dtype)
    assert torch.isnan(y[0, 0, 3]).all() and torch.isfinite(y[0, 0, torch.arange(8) != 3]).all()


def test_values_beyond_fp16_range_are_refused_with_check_finite():
    x = torch.randn(1, 1, 4, 16)
    x[0, 0, 0, 0] = 1e6
    layout = SegmentLayout(GearConfig(method="kcvt").key_spec(), "k", 4, 0, 0, 16, torch.float32)
    with pytest.raises(ValueError, match="beyond the fp16 range"):
        compress(x, layout, check_finite=True)


def test_power_iteration_recovers_an_exact_low_rank_matrix():
    a, b = torch.randn(3, 40, 2), torch.randn(3, 16, 2)
    r = a @ b.transpose(-1, -2)
    A, B = power_iteration(r, rank=2, iters=4)
    assert relative_error(r, A @ B.transpose(-1, -2)) < 1e-4


def kv_like(tokens=256, head_dim=64, seed=0):
    """K/V with the structure the paper reports: K has a few large-magnitude
    channels (per-channel outliers), V is heavy-tailed per token, and both share
    a low-rank component across tokens (the coherent residual GEAR's L targets)."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(1, 2, tokens, 3, generator=g) @ torch.randn(1, 2, 3, head_dim, generator=g)
    k = torch.randn(1, 2, tokens, head_dim, generator=g) + 2 * shared
    k[..., :4] *= 8                                       # outlier channels
    v = torch.distributions.StudentT(3.0).sample((1, 2, tokens, head_dim)) + shared
    return k, v


def store_error(x, kind, **options):
    store = KVStore.from_prefill(x[:, :, :192], GearConfig(**options), kind)
    for t in range(192, x.shape[2]):
        store.append(x[:, :, t:t + 1])
    return relative_error(x, store.dequantize())


@pytest.mark.parametrize("bits,backbone", [(4, "kcvt"), (2, "kivi")])
@pytest.mark.parametrize("kind", ["k", "v"])
def test_gear_beats_gear_l_beats_its_backbone(bits, backbone, kind):
    k, v = kv_like()
    x = k if kind == "k" else v
    errors = {m: store_error(x, kind, method=m, bits=bits, **({} if m == backbone else {"backbone": backbone}))
              for m in (backbone, "gear_l", "gear")}
    assert errors["gear"] < errors["gear_l"] < errors[backbone], \
        f"{kind} at {bits} bits over {backbone}: relative errors {errors}"


def test_appending_compresses_only_the_block_that_fills():
    config = GearConfig(method="gear", bits=4, buffer_size=8)
    k, _ = kv_like(tokens=64)
    store = KVStore.from_prefill(k[:, :, :30], config, "k")
    for t in range(30, 46):
        store.append(k[:, :, t:t + 1])
    assert store.counts() == (30, 16, 0)
    first_blocks = {n: t.clone() for n, t in store.decode.parts().items()}
    for t in range(46, 64):
        store.append(k[:, :, t:t + 1])
    assert store.counts() == (30, 32, 2)
    for part in store.d_layout.parts:                  # the first 16 tokens' rows never change
        n = part.rows(16)
        after, before = getattr(store.decode, part.name), first_blocks[part.name]
        assert torch.equal(after[:, :, :n], before[:, :, :n]), part.name
    # the buffer holds the newest tokens exactly
    assert torch.equal(store.buffer[:, :, :2], k[:, :, 62:64].to(store.buffer.dtype))


def test_capacity_grows_and_keeps_compressed_blocks():
    config = GearConfig(method="kcvt", bits=4, buffer_size=4, decode_capacity=8)
    k, _ = kv_like(tokens=40)
    store = KVStore.from_prefill(k[:, :, :20], config, "k")
    for t in range(20, 28):
        store.append(k[:, :, t:t + 1])
    before = store.dequantize()
    store.grow(min_free=4)
    assert store.capacity > 8 and torch.equal(store.dequantize(), before)
    store.append(k[:, :, 28:40])                 # fills the capacity: the next flush grows it
    assert store.counts() == (20, 20, 0) and store.capacity >= 20


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 2), H=st.integers(1, 3), P=st.integers(1, 40), T=st.integers(0, 30),
       D=st.sampled_from([8, 16, 24]), bits=st.sampled_from([2, 4, 8]),
       method=st.sampled_from(["gear", "gear_l", "kcvt", "kivi", "per_token", "none"]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_any_shape_round_trips_with_its_logical_shape(B, H, P, T, D, bits, method, dtype):
    config = GearConfig(method=method, bits=bits, group_size=8, buffer_size=8, decode_capacity=8)
    x = torch.randn(B, H, P + T, D).to(dtype)
    store = KVStore.from_prefill(x[:, :, :P], config, "v")
    for t in range(P, P + T):
        store.grow(8)
        store.append(x[:, :, t:t + 1])
    kv = CompressedKV(store)
    y = kv.dequantize()
    assert kv.shape == x.shape and y.shape == x.shape and y.dtype == dtype
    n_buf = store.counts()[2]
    held = x[:, :, P + T - n_buf:].to(store.buffer.dtype).to(dtype)          # buffer is exact,
    assert torch.equal(y[:, :, P + T - n_buf:], held)                        # in its held dtype
    if method == "none":
        assert torch.equal(y, x)
    else:
        assert relative_error(x, y) < {2: 0.9, 4: 0.25, 8: 0.02}[bits]
