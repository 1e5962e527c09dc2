"""The decode step as a graph (`passes.rewrite` decode sites + `runtime`).

Specification: one decode graph serves every step (no recompile over 1,000
steps, capacity growth included); the per-token graph writes the new token
into the buffer and bumps the lengths on the device, reads nothing on the
host and holds no flush; the block a step fills is compressed after that
step's attention (the step attends to it exactly); flushes happen once every
n_b tokens, for all layers in one batched call; several tokens at once are
attended, then appended.
"""
import pytest
import torch
from torch._dynamo.utils import counters
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

import gear_compile
from gear_compile import runtime
from gear_compile.config import GearConfig
from gear_compile.hf_compat import cache_kwarg
from gear_compile.models import tiny_model
from gear_compile.store import KVStore

from decoding import PROMPT, decode_logits


def test_a_thousand_decode_steps_use_one_decode_graph():
    """decode_capacity=20 grows about ten times over 1,000 steps: growth changes
    inner shapes, which are dynamic from the first decode graph on."""
    model = gear_compile.compile(tiny_model("llama"), method="gear", bits=4, inductor=False,
                                 decode_capacity=20)
    counters.clear()
    _, cache = decode_logits(model, steps=1000)
    store = cache.layers[0].keys.store
    assert store.capacity > 500 and len(store) == PROMPT.shape[1] + 1000
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])   # prefill + decode


def _decode_aten_graph(monkeypatch, **options):
    """The functionalized aten graph of the per-token decode step, as code."""
    from torch._functorch.aot_autograd import aot_module_simplified

    from gear_compile import backend
    codes = []

    def capture(gm, example_inputs):
        codes.append(gm.code)
        return gm

    monkeypatch.setattr(backend, "_lower", lambda gm, inputs, *options: aot_module_simplified(
        gm, inputs, fw_compiler=capture))
    decode_logits(gear_compile.compile(tiny_model("llama"), **options), steps=2)
    torch._dynamo.reset()
    (decode,) = [c for c in codes if "attention_cpu" in c]
    return decode


def test_the_per_token_graph_writes_on_the_device_and_reads_nothing_on_the_host(monkeypatch):
    code = _decode_aten_graph(monkeypatch, method="gear", bits=4)
    assert code.count("torch.ops.gear.attention_cpu.default") == 2        # one per layer
    assert code.count("torch.ops.aten.index_copy") == 4                   # K and V buffers
    for host_work in ("_local_scalar_dense", ".item()", "tolist", "kv_prefill", "kv_append",
                      "gear.decompress", "nonzero"):
        assert host_work not in code, host_work


class _ReferenceLayer(DynamicLayer):
    """Attention over the decompressed store plus the step's exact K/V; the
    step's tokens are appended (and a full block flushed) afterwards, or
    before attention with `compress_first` (the order the backend avoids)."""

    def __init__(self, config: GearConfig, compress_first=False):
        super().__init__()
        self.config, self.compress_first, self.stores = config, compress_first, None

    def update(self, key_states, value_states, *args, **kwargs):
        if self.stores is None:
            self.lazy_initialization(key_states, value_states)
            self.stores = [KVStore.from_prefill(x, self.config, kind)
                           for x, kind in ((key_states, "k"), (value_states, "v"))]
            return key_states, value_states
        out = []
        for store, new in zip(self.stores, (key_states, value_states)):
            if self.compress_first:
                store.append(new)
                out.append(store.decompress())
            else:
                out.append(torch.cat([store.decompress(), new], dim=2))
                store.append(new)
        return tuple(out)

    def get_seq_length(self) -> int:
        return len(self.stores[0]) if self.stores else 0

    def get_mask_sizes(self, query_length: int):
        return self.get_seq_length() + query_length, 0


def _reference_logits(config, steps, compress_first=False):
    model = tiny_model("llama")
    cache = DynamicCache(config=model.config)
    cache.layers = [_ReferenceLayer(config, compress_first) for _ in cache.layers]
    return decode_logits(model, steps, cache=cache)[0]


def test_the_block_a_step_fills_is_compressed_after_its_attention():
    options = dict(method="kivi", bits=2, group_size=8, buffer_size=8)
    config = GearConfig(**options)
    got, _ = decode_logits(gear_compile.compile(tiny_model("llama"), inductor=False, **options), 20)
    after = _reference_logits(config, 20)
    before = _reference_logits(config, 20, compress_first=True)
    torch.testing.assert_close(got, after, rtol=1e-4, atol=1e-4)
    # the test can tell the two orders apart: they differ at the steps that fill a block
    assert (before - after).abs().max() > 1e-2


def test_flushes_happen_once_every_n_b_tokens_for_all_layers_at_once(monkeypatch):
    calls = []
    flush = runtime.flush_stores
    monkeypatch.setattr(runtime, "flush_stores", lambda stores: (calls.append(len(stores)), flush(stores)))
    model = gear_compile.compile(tiny_model("llama"), method="gear", bits=4, inductor=False,
                                 buffer_size=8, sink_tokens=4)
    _, cache = decode_logits(model, steps=40)           # prompt 11 tokens: all in the prefill block
    assert calls == [4] * 5                             # 2 layers x K and V, every 8 steps
    store = cache.layers[1].values.store
    assert store.sink.shape[2] == 4 and store.counts() == (11, 40, 0)


@pytest.mark.parametrize("method", ["none", "gear"])
def test_several_new_tokens_are_attended_then_appended(method):
    """Chunks of 5 tokens through a compressed cache (as speculative decoding
    verifies drafts): method none equals eager; gear equals the reference order."""
    options = dict(method=method, bits=4, buffer_size=8, sink_tokens=4)
    ids = torch.randint(0, 256, (1, 36), generator=torch.Generator().manual_seed(5))
    model = gear_compile.compile(tiny_model("llama"), inductor=False, **options)
    reference = tiny_model("llama")
    ref_cache = DynamicCache(config=reference.config)
    if method != "none":
        ref_cache.layers = [_ReferenceLayer(GearConfig(**options)) for _ in ref_cache.layers]
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        for start, end in ((0, 11), (11, 16), (16, 21), (21, 26), (26, 31), (31, 36)):
            got = model(input_ids=ids[:, start:end], **cache_kwarg(model, cache), use_cache=True).logits
            want = reference(input_ids=ids[:, start:end], **cache_kwarg(reference, ref_cache), use_cache=True).logits
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    store = cache.layers[0].keys.store
    assert isinstance(cache.layers[0].keys, gear_compile.CompressedKV) and len(store) == 36
    assert store.counts() == (11, 24, 1)
