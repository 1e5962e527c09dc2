"""Specification of `gear_compile.store`: the layout (one ordered list of
inner tensors, shapes derived from each part's token unit, the CPU kernel's
descriptor), the streaming store (exact sinks, prefill block, n_b-token
decode blocks in a reserved capacity, exact buffer), the host counts kept in
step with the device lengths, flushing (batched across stores, bit-exact)
and growth."""
import pytest
import torch

from gear_compile.compressed_kv import CompressedKV
from gear_compile.config import GearConfig
from gear_compile.segment import compress
from gear_compile.store import KERNEL_FIELDS, KERNEL_PARTS, KVStore, StoreLayout, flush_stores

from streams import filled_decode_parts, streamed


# ---------------------------------------------------------------- layout
@pytest.mark.parametrize("method", ["gear", "kivi", "per_token", "none"])
@pytest.mark.parametrize("kind", ["k", "v"])
def test_the_layout_names_shapes_and_dtypes_are_those_of_the_store(method, kind):
    config = GearConfig(method=method, bits=2, group_size=8, buffer_size=8, decode_capacity=24)
    store = KVStore.from_prefill(torch.randn(2, 3, 40, 16), config, kind)
    layout = StoreLayout.build(config, kind, 16, torch.float32, store.counts()[0], store.sink.shape[2])
    assert layout is store.layout
    expected = layout.shapes(2, 3, store.capacity)
    assert len(layout.names) == len(store.tensors()) == len(expected)
    for name, tensor, (shape, dtype) in zip(layout.names, store.tensors(), expected):
        assert tuple(tensor.shape) == tuple(shape) and tensor.dtype == dtype, name


def test_only_the_decode_parts_grow():
    layout = StoreLayout.build(GearConfig(method="gear"), "k", 16, torch.float32, 30)
    grows = [n for n in layout.names if layout.grows(n)]
    assert grows == [n for n in layout.names if n.startswith("d_")] and "buffer" not in grows


@pytest.mark.parametrize("method", ["gear", "gear_l", "kivi", "none"])
def test_the_kernel_descriptor_points_at_the_named_parts(method):
    layout = StoreLayout.build(GearConfig(method=method, bits=2), "v", 64, torch.float32, 130)
    desc = layout.kernel_descriptor
    names = layout.names
    assert names[desc[0]] == "lengths" and names[desc[1]] == "buffer"
    n = len(KERNEL_FIELDS)
    segments = [desc[2 + i * n:2 + (i + 1) * n] for i in range(4)]
    assert len(desc) == 2 + 4 * n
    for prefix, seg in zip(("sink", "p_", "d_", "buffer"), segments):
        for field, index in zip(KERNEL_PARTS, seg[len(KERNEL_FIELDS) - len(KERNEL_PARTS):]):
            if prefix in ("sink", "buffer"):       # exact values, nothing else
                assert (names[index] == prefix) if field == "codes" else index == -1
            elif index >= 0:
                assert names[index] == prefix + field
            else:
                assert prefix + field not in names


# ---------------------------------------------------------------- prefill and buffer
def fp16_values(*shape) -> torch.Tensor:
    """fp32 values an fp16 buffer holds exactly, so "exact" can mean equal."""
    return torch.randn(*shape).half().float()


@pytest.mark.parametrize("dtype, method, held", [
    (torch.float32, "gear", torch.float16), (torch.float32, "kivi", torch.float16),
    (torch.float32, "none", torch.float32), (torch.bfloat16, "gear", torch.bfloat16),
    (torch.float16, "kcvt", torch.float16)])
def test_the_buffer_holds_fp32_tokens_in_fp16_and_the_store_stays_the_models_dtype(dtype, method, held):
    config = GearConfig(method=method, bits=4, group_size=8, buffer_size=8)
    x = torch.randn(1, 2, 21, 16).to(dtype)
    store = KVStore.from_prefill(x[:, :, :20], config, "v")
    store.append(x[:, :, 20:])
    n_buf = store.counts()[2]
    assert store.buffer.dtype == held and store.dtype == dtype and n_buf > 0
    assert torch.equal(store.buffer[:, :, :n_buf], x[:, :, 21 - n_buf:].to(held))
    assert store.decompress().dtype == dtype
    kv = CompressedKV(store)
    assert kv.dtype == dtype and kv.decompress().dtype == dtype
    names, meta = kv.__tensor_flatten__()
    again = CompressedKV.__tensor_unflatten__({n: getattr(kv, n) for n in names}, meta, kv.shape, kv.stride())
    assert again.dtype == dtype
    assert store.batch_select(torch.tensor([0, 0])).dtype == dtype and store.cropped(3).dtype == dtype


def test_kivi_prefill_compresses_whole_groups_and_buffers_the_rest():
    config = GearConfig(method="kivi", bits=2, group_size=8, buffer_size=8)
    x = fp16_values(1, 2, 21, 16)
    store = KVStore.from_prefill(x, config, "k")
    assert store.counts() == (16, 0, 5)
    assert torch.equal(store.buffer[:, :, :5], x[:, :, 16:])


def test_kcvt_prefill_compresses_every_prefill_token():
    store = KVStore.from_prefill(torch.randn(1, 2, 21, 16), GearConfig(method="kcvt", sink_tokens=4), "k")
    assert store.counts() == (21, 0, 0) and store.sink.shape[2] == 4 and len(store) == 21


@pytest.mark.parametrize("method", ["kcvt", "kivi", "gear"])
@pytest.mark.parametrize("kind", ["k", "v"])
def test_the_sinks_are_exact_and_stretch_no_group(method, kind):
    """The first sink_tokens are held exact, and the rest is stored exactly as
    a store without sinks stores the prompt with those tokens replaced by
    copies of the next one: a huge first token widens no group's range, and
    the groups stay where they were."""
    config = GearConfig(method=method, bits=2, group_size=8, buffer_size=8, sink_tokens=4)
    x = fp16_values(2, 3, 45, 16)
    x[:, :, 0] *= 256
    store = KVStore.from_prefill(x, config, kind)
    shadowed = torch.cat([x[:, :, 4:5].expand(-1, -1, 4, -1), x[:, :, 4:]], dim=2)
    alone = KVStore.from_prefill(shadowed, GearConfig.from_options(config, sink_tokens=0), kind)
    assert torch.equal(store.sink.float(), x[:, :, :4]) and store.counts() == alone.counts()
    for name in alone.layout.names:
        if name != "sink":
            assert torch.equal(store.tensors()[store.layout.names.index(name)],
                               alone.tensors()[alone.layout.names.index(name)]), name
    dense = store.decompress()
    assert torch.equal(dense[:, :, :4], x[:, :, :4])
    assert torch.equal(dense[:, :, 4:], alone.decompress()[:, :, 4:])
    assert store.breakdown()["exact sinks"] == 2 * 3 * 4 * 16 * 2


def test_a_prompt_shorter_than_the_sinks_is_all_sinks_and_a_crop_slices_them():
    """(kcvt: the prefill block takes every prompt token.)"""
    config = GearConfig(method="gear", bits=4, backbone="kcvt", sink_tokens=4)
    x = fp16_values(1, 2, 3, 16)
    store = KVStore.from_prefill(x, config, "k")
    assert store.sink.shape[2] == 3 and store.counts() == (3, 0, 0)
    store.append(fp16_values(1, 2, 5, 16))
    assert len(store) == 8 and store.counts() == (3, 0, 5)
    crop = store.cropped(2)
    assert crop.counts() == (2, 0, 0) and crop.sink.shape[2] == 2
    assert torch.equal(crop.decompress(), x[:, :, :2])
    assert torch.equal(store.cropped(6).decompress(), store.decompress()[:, :, :6])


def test_the_lengths_live_on_the_device_of_the_cache_and_match_the_host_counts():
    store = streamed(torch.randn(1, 2, 47, 16), GearConfig(method="gear", buffer_size=8), "v", 10)
    assert store.lengths.device == store.buffer.device and store.lengths.dtype == torch.int64
    assert tuple(store.lengths.tolist()) == store.counts() == (10, 32, 5)


def test_a_store_rebuilt_from_bare_tensors_reads_its_counts_from_the_device():
    store = streamed(torch.randn(1, 2, 30, 16), GearConfig(method="kcvt", buffer_size=8), "k", 10)
    again = KVStore(store.config, "k", store.tensors())
    assert again.counts() == store.counts() == (10, 16, 4)


def test_append_below_the_flush_point_only_fills_the_buffer():
    config = GearConfig(method="gear", buffer_size=8)
    x = fp16_values(1, 2, 17, 16)
    store = KVStore.from_prefill(x[:, :, :10], config, "v")
    store.append(x[:, :, 10:17])
    assert store.counts() == (10, 0, 7)
    assert all((t == 0).all() for t in store.decode.parts().values())
    assert torch.equal(store.buffer[:, :, :7], x[:, :, 10:17])


def test_the_flush_point_compresses_exactly_one_block_and_keeps_the_rest_exact():
    config = GearConfig(method="gear", buffer_size=8)
    x = fp16_values(1, 2, 21, 16)
    store = KVStore.from_prefill(x[:, :, :10], config, "v")
    store.append(x[:, :, 10:21])
    assert store.counts() == (10, 8, 3)
    assert torch.equal(store.buffer[:, :, :3], x[:, :, 18:21])


def test_a_flushed_block_is_the_block_compressed_on_its_own():
    config = GearConfig(method="gear", bits=4, buffer_size=8, outlier_ratio=0.25)
    x = fp16_values(1, 2, 26, 16)
    store = streamed(x, config, "k", 10)
    alone = compress(x[:, :, 10:26], store.d_layout)
    for name, t in alone.parts().items():
        assert torch.equal(filled_decode_parts(store)[name], t), name


def test_a_token_written_by_the_graph_is_counted_and_flushes_when_the_buffer_fills():
    """The decode graph writes the token and bumps the device lengths; the
    runtime only records it (`wrote`) and flushes when told to."""
    config = GearConfig(method="gear", buffer_size=4)
    x = fp16_values(1, 2, 14, 16)
    store = KVStore.from_prefill(x[:, :, :10], config, "k")
    for t in range(10, 14):
        store.buffer[:, :, t - 10] = x[:, :, t]           # what the graph does
        store.lengths[2] += 1
        full = store.wrote(1)
        assert full == (t == 13)
    flush_stores([store])
    assert store.counts() == tuple(store.lengths.tolist()) == (10, 4, 0)
    assert torch.equal(filled_decode_parts(store)["codes"], compress(x[:, :, 10:14], store.d_layout).codes)


def test_flushing_many_stores_at_once_equals_flushing_each_alone():
    config = GearConfig(method="gear", bits=2, group_size=8, buffer_size=8, outlier_ratio=0.25)
    xs = [torch.randn(2, 3, 40, 16) for _ in range(3)]
    together = [streamed(x[:, :, :39], config, "v", 10) for x in xs]
    alone = [streamed(x[:, :, :39], config, "v", 10) for x in xs]
    for s, x in zip(together + alone, xs + xs):
        s.buffer[:, :, s.counts()[2]] = x[:, :, 39]
        s.lengths[2] += 1
        assert s.wrote(1)
    flush_stores(together)
    for s in alone:
        flush_stores([s])
    for a, b in zip(together, alone):
        assert a.counts() == b.counts() == (8, 32, 0)
        for (name, ta), tb in zip(filled_decode_parts(a).items(), filled_decode_parts(b).values()):
            assert torch.equal(ta, tb), name


@pytest.mark.parametrize("method", ["gear", "kivi", "per_token"])
def test_appending_in_chunks_equals_appending_one_token_at_a_time(method):
    config = GearConfig(method=method, bits=2, group_size=8, buffer_size=8, decode_capacity=8)
    x = torch.randn(1, 2, 60, 16)
    one = streamed(x, config, "v", 13, chunk=1)
    chunked = streamed(x, config, "v", 13, chunk=7)
    assert one.counts() == chunked.counts()
    assert torch.equal(one.decompress(), chunked.decompress())
    assert all(torch.equal(a, b) for a, b in zip(filled_decode_parts(one).values(),
                                                 filled_decode_parts(chunked).values()))


def test_appending_never_recompresses_earlier_blocks():
    config = GearConfig(method="gear", bits=4, buffer_size=4, decode_capacity=4, outlier_ratio=0.5)
    x = torch.randn(1, 2, 60, 16)
    store = streamed(x, config, "k", 10)
    for end in range(14, 60, 3):
        before = filled_decode_parts(store)
        for t in range(len(store), end):
            store.append(x[:, :, t:t + 1])
        after = filled_decode_parts(store)
        for name, old in before.items():
            assert torch.equal(after[name][:, :, :old.shape[2]], old), f"{name} changed before token {end}"


# ---------------------------------------------------------------- capacity
def test_a_full_capacity_grows_at_the_flush_and_keeps_the_content():
    config = GearConfig(method="kcvt", buffer_size=4, decode_capacity=8)
    x = torch.randn(1, 1, 30, 16)
    store = streamed(x, config, "k", 10, grow=False)
    assert store.capacity > 8 and store.counts() == (10, 20, 0)
    reference = streamed(x, GearConfig(method="kcvt", buffer_size=4, decode_capacity=40), "k", 10)
    assert torch.equal(store.decompress(), reference.decompress())


def test_grow_leaves_the_tensors_alone_when_there_is_room():
    store = KVStore.from_prefill(torch.randn(1, 1, 10, 16), GearConfig(method="kcvt", decode_capacity=40), "k")
    before = list(store.tensors())
    store.grow(20)
    assert all(a is b for a, b in zip(before, store.tensors()))


def test_grow_adds_at_least_a_quarter_in_whole_blocks_and_keeps_the_content():
    config = GearConfig(method="gear", buffer_size=4, decode_capacity=40)
    x = torch.randn(1, 2, 60, 16)
    store = KVStore.from_prefill(x[:, :, :10], config, "k")
    store.append(x[:, :, 10:48])
    before = store.decompress()
    store.grow(8)
    assert store.capacity == 52 and store.capacity % 4 == 0          # 40 + max(8 - 4, 40 // 4)
    assert torch.equal(store.decompress(), before)
    assert store.decode.codes is store.tensors()[store.layout.names.index("d_codes")]


def test_initial_capacity_is_rounded_up_to_whole_blocks():
    store = KVStore.from_prefill(torch.randn(1, 1, 4, 16), GearConfig(method="kcvt", decode_capacity=30), "k")
    assert store.capacity == 40


def test_check_finite_on_append_refuses_nan_in_the_flushed_block():
    config = GearConfig(method="gear", buffer_size=4)
    x = torch.randn(1, 1, 14, 16)
    x[0, 0, 12, 3] = torch.nan
    store = KVStore.from_prefill(x[:, :, :10], config, "v", check_finite=True)
    with pytest.raises(ValueError, match=r"1 non-finite value\(s\), first at index \(0, 0, 2, 3\)"):
        store.append(x[:, :, 10:14], check_finite=True)
