"""Specification of `gear_compile.compressed_kv`: the `CompressedKV` tensor
(logical shape, dispatch fallback to the dense reconstruction,
flatten/unflatten), `kv_bytes` checked against counts made by hand from the
layout, and any stream round-tripping through it. The store itself is
specified in test_store.py."""
import types

import pytest
import torch
from hypothesis import given, settings, strategies as st

from gear_compile.compressed_kv import CompressedKV, dense_bytes, kv_breakdown, kv_bytes
from gear_compile.config import GearConfig
from gear_compile.lowrank import relative_error
from gear_compile.store import KVStore

from streams import filled_decode_parts, streamed

METHODS = ["gear", "gear_l", "kcvt", "kivi", "per_token", "none"]


def make_kv(method="gear", tokens=29, dtype=torch.float16):
    config = GearConfig(method=method, buffer_size=8, decode_capacity=16)
    x = torch.randn(2, 3, tokens, 16).to(dtype)
    return CompressedKV(streamed(x, config, "k", 10)), x


def test_compressed_kv_has_the_dense_logical_shape_and_dtype():
    kv, x = make_kv(dtype=torch.bfloat16)
    assert kv.shape == x.shape and kv.dtype == torch.bfloat16


def test_compressed_kv_dequantize_equals_the_store_reconstruction():
    kv, _ = make_kv()
    assert torch.equal(kv.decompress(), kv.store.decompress())


@pytest.mark.parametrize("op", [
    lambda t: t + 1, lambda t: t.sum(dim=2), lambda t: t[:, :, -3:], lambda t: t.float(),
    lambda t: t @ torch.ones(16, 4, dtype=t.dtype), lambda t: torch.cat([t, t], dim=2)],
    ids=["add", "sum", "slice", "to-float", "matmul", "cat"])      # beam reorders: test_cache_ops
def test_any_other_op_runs_on_the_dense_reconstruction(op):
    kv, _ = make_kv()
    out = op(kv)
    assert type(out) is torch.Tensor
    assert torch.equal(out, op(kv.decompress()))


def test_flatten_then_unflatten_rebuilds_the_same_cache():
    kv, _ = make_kv()
    names, meta = kv.__tensor_flatten__()
    again = CompressedKV.__tensor_unflatten__({n: getattr(kv, n) for n in names}, meta, kv.shape, kv.stride())
    assert again.shape == kv.shape and torch.equal(again.decompress(), kv.decompress())


def test_repr_names_the_method_and_the_bytes_held():
    kv, _ = make_kv()
    assert "gear(" in repr(kv) and f"bytes={kv_bytes(kv)}" in repr(kv)


# ---------------------------------------------------------------- kv_bytes
def test_kv_bytes_of_a_gear_kcvt_key_store_equals_a_hand_count():
    """GEAR over KCVT-4, K, B=1, H=2, D=16, n_b=4, capacity 8, s=20 %, 4 sinks; prefill 10
    then 5 appends."""
    config = GearConfig(method="gear", bits=4, buffer_size=4, decode_capacity=8, outlier_ratio=0.2)
    x = torch.randn(1, 2, 15, 16, dtype=torch.float16)
    kv = CompressedKV(streamed(x, config, "k", 10, grow=False))
    assert kv.store.counts() == (10, 4, 1) and kv.store.capacity == 8
    heads = 2
    prefill = (10 * 8            # codes: 16 channels x 4 bits = 8 bytes a token
               + 16 * 2 * 2      # scale + zero: fp16, one per channel (one group: the 10-token block)
               + 10 * 4 * 1      # A: rank r_p = 4, int8, per token
               + 16 * 4 * 1      # B: 16 x 4, int8, one block
               + 4 * 4           # the block's scale per rank, fp32
               + 2 * 16 * 1      # outlier values: 1 a side (0.1 x 10) per channel, int8 steps
               + 2 * 16 * 2      # their positions: (token, channel) records, 16 bits each
               + 2 * 4)          # record-tile pointers: ceil(10 / 16) + 1, int32
    decode = (8 * 8              # codes for all 8 reserved tokens (4 used)
              + 2 * 16 * 2 * 2   # scale + zero per channel for each of 2 blocks
              + 8 * 2 * 1        # A: rank r_g = 2 per reserved token, int8
              + 2 * (16 * 2 + 2 * 4))  # B: 16 x 2 int8 + 2 fp32 scales per block; no outliers
                                       # (0.1 x 4 rounds to 0)
    buffer = 4 * 16 * 2          # n_b fp16 tokens, 1 used
    sinks = 4 * 16 * 2           # the first 4 tokens, exact fp16 (the block still holds their places)
    lengths = 3 * 8              # int64 token counts of the three segments
    assert kv_bytes(kv) == heads * (prefill + decode + buffer + sinks) + lengths == 1848
    # reserved: the second decode block (codes, scale/zero, A, B and its scales) and 3 empty buffer slots
    split = kv_breakdown(kv)
    assert split.held == 1848 and split.reserved == heads * ((4 * 8 + 16 * 2 * 2 + 4 * 2 + 16 * 2 + 2 * 4)
                                                             + 3 * 16 * 2) == 480
    assert split.used == 1848 - 480 and split.kinds["lengths"] == 24 and split.kinds["exact sinks"] == 256
    assert split.kinds["low-rank"] == heads * (10 * 4 + 16 * 4 + 4 * 4 + 4 * 2 + 16 * 2 + 2 * 4)


def test_kv_bytes_of_a_gear_kivi_value_store_equals_a_hand_count():
    """GEAR over KIVI-2, V, B=1, H=1, D=16, g=8, n_b=8, capacity 16 (the two-block
    minimum), s=25 %, 4 sinks; prefill 20 then 6 appends."""
    config = GearConfig(method="gear", bits=2, group_size=8, buffer_size=8, decode_capacity=8,
                        outlier_ratio=0.25, sink_tokens=4)
    x = torch.randn(1, 1, 26, 16, dtype=torch.float16)
    kv = CompressedKV(streamed(x, config, "v", 20, grow=False))
    assert kv.store.counts() == (16, 8, 2)
    prefill = (16 * 4            # codes: 16 channels x 2 bits = 4 bytes a token
               + 16 * 2 * 2 * 2  # scale + zero: fp16 per token per group of 8 channels
               + 16 * 4 * 1      # A: rank 4, int8
               + 16 * 4 + 4 * 4  # B: 16 x 4 int8 and 4 fp32 scales, one block
               + 16 * 4 * 1      # outlier values: 2 a side (0.125 x 16) per token, int8 steps
               + 16 * 4 * 1)     # outlier indices: uint8 (16 channels)
    decode = 2 * (8 * 4 + 8 * 2 * 2 * 2 + 8 * 2 * 1 + 16 * 2 + 2 * 4 + 8 * 4 * 1 + 8 * 4)  # 2 blocks
    buffer = 8 * 16 * 2
    sinks = 4 * 16 * 2           # the first 4 tokens, exact fp16
    lengths = 3 * 8
    assert kv_bytes(kv) == prefill + decode + buffer + sinks + lengths == 1304


def test_kv_bytes_counts_reserved_capacity_even_before_it_is_used():
    config = GearConfig(method="kcvt", buffer_size=4, decode_capacity=4)
    store = KVStore.from_prefill(torch.randn(1, 1, 8, 16), config, "k")
    before = kv_bytes(CompressedKV(store))
    store.grow(store.capacity + 4)
    assert kv_bytes(CompressedKV(store)) > before


def test_kv_bytes_of_dense_tensors_lists_and_caches_is_numel_times_itemsize():
    k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8, dtype=torch.bfloat16)
    cache = types.SimpleNamespace(layers=[types.SimpleNamespace(keys=k, values=v),
                                          types.SimpleNamespace(keys=None, values=None)])
    assert kv_bytes(k) == 80 * 4 and kv_bytes([k, v]) == 80 * 4 + 80 * 2 == kv_bytes(cache)


def test_dense_bytes_is_the_fp16_size_of_the_logical_tensor():
    kv, x = make_kv(dtype=torch.float32)
    assert dense_bytes(kv) == x.numel() * 2 and dense_bytes([kv, kv], torch.float32) == x.numel() * 8


def test_kv_bytes_refuses_what_it_cannot_measure():
    with pytest.raises(TypeError, match="expected a tensor, CompressedKV or cache, got int"):
        kv_bytes(3)


# ---------------------------------------------------------------- properties
@settings(max_examples=100, deadline=None)
@given(B=st.integers(1, 2), H=st.integers(1, 3), P=st.integers(0, 40), T=st.integers(0, 40),
       D=st.sampled_from([8, 16, 24]), bits=st.sampled_from([2, 4, 8]), method=st.sampled_from(METHODS),
       kind=st.sampled_from(["k", "v"]), chunk=st.integers(1, 9),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_any_stream_round_trips_with_its_shape_an_exact_buffer_and_frozen_blocks(
        B, H, P, T, D, bits, method, kind, chunk, dtype):
    config = GearConfig(method=method, bits=bits, group_size=8, buffer_size=8, decode_capacity=8)
    x = torch.randn(B, H, max(P, 1) + T, D).to(dtype)
    P = max(P, 1)
    store = KVStore.from_prefill(x[:, :, :P], config, kind)
    for t in range(P, P + T, chunk):
        before = filled_decode_parts(store)
        new = x[:, :, t:t + chunk]
        store.append(new)
        after = filled_decode_parts(store)
        for name, old in before.items():            # flushed blocks never change
            assert torch.equal(after[name][:, :, :old.shape[2]], old), name
    kv = CompressedKV(store)
    y = kv.decompress()
    assert kv.shape == y.shape == x.shape and y.dtype == dtype
    assert torch.equal(y, store.decompress())
    n_buf = store.counts()[2]
    held = x[:, :, x.shape[2] - n_buf:].to(store.buffer.dtype).to(dtype)   # the buffer is exact,
    assert torch.equal(y[:, :, x.shape[2] - n_buf:], held)                  # in its held dtype
    if method == "none":
        assert torch.equal(y, x)
    else:
        assert relative_error(x, y) < {2: 0.9, 4: 0.25, 8: 0.02}[bits], (method, bits, kind, dtype)


def test_kv_breakdown_of_a_cache_sums_its_layers_and_counts_dense_tensors():
    config = GearConfig(method="gear", bits=2, group_size=8, buffer_size=8, decode_capacity=32)
    k, v = (CompressedKV(KVStore.from_prefill(torch.randn(1, 2, 30, 16), config, kind))
            for kind in ("k", "v"))
    dense = torch.randn(1, 2, 30, 16)
    cache = types.SimpleNamespace(layers=[types.SimpleNamespace(keys=k, values=v),
                                          types.SimpleNamespace(keys=dense, values=dense)])
    split = kv_breakdown(cache)
    assert split.held == kv_bytes(cache) and split.kinds["dense"] == 2 * dense.numel() * 4
    assert split.reserved == sum(kv_breakdown(t).reserved for t in (k, v)) > 0
