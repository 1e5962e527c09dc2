"""The host-side work of one decode step, counted (`runtime`, `compressed_kv`, `backend`).

Specification: through `generate`, every decode step after the first makes
one call of the compiled graph and of the runtime's run around it, wraps
each layer's K and V once as a CompressedKV, rebuilds no KVStore, writes no
config JSON (flattening a store for Dynamo's guards reuses what the store's
first flattening built), compiles nothing, and flushes once every n_b steps.
Counts, not times: the difference between two `generate` calls of different
lengths is the per-step count, prefill and first step cancelling out, so an
extra call per step (a graph break, a rebuilt object) fails here on any
machine.
"""
import pytest
import torch
from torch._dynamo.utils import counters

import gear_compile
from gear_compile import backend, compressed_kv, runtime
from gear_compile.config import CodecConfig
from gear_compile.models import tiny_model
from gear_compile.store import KVStore

from decoding import PROMPT, greedy

N_B = 8


@pytest.fixture
def calls(monkeypatch):
    """Counters of the host-side entry points, patched where they are called from."""
    seen = dict.fromkeys(["graph", "run", "CompressedKV", "KVStore", "to_json", "flush"], 0)

    def counted(name, fn):
        def call(*args, **kwargs):
            seen[name] += 1
            return fn(*args, **kwargs)
        return call

    lower, wrap = backend._lower, backend.wrap
    monkeypatch.setattr(backend, "_lower", lambda *a, **k: counted("graph", lower(*a, **k)))
    monkeypatch.setattr(backend, "wrap", lambda *a, **k: counted("run", wrap(*a, **k)))
    monkeypatch.setattr(runtime, "flush_stores", counted("flush", runtime.flush_stores))
    of = compressed_kv.CompressedKV.of.__func__
    monkeypatch.setattr(compressed_kv.CompressedKV, "of", classmethod(counted("CompressedKV", of)))
    monkeypatch.setattr(KVStore, "__init__", counted("KVStore", KVStore.__init__))
    monkeypatch.setattr(CodecConfig, "to_json", counted("to_json", CodecConfig.to_json))
    return seen




@pytest.mark.parametrize("method, bits", [("gear", 4), ("gear", 2), ("kivi", 2)])
def test_each_decode_step_makes_one_graph_call_and_wraps_each_store_once(calls, method, bits):
    model = gear_compile.compile(tiny_model("llama"), method=method, bits=bits, inductor=False,
                                 buffer_size=N_B, group_size=N_B, sink_tokens=4)
    layers = model.config.num_hidden_layers
    greedy(model, PROMPT, 2 * N_B + 1)                 # compiles the prefill and decode graphs
    graphs = counters["stats"]["unique_graphs"]
    before = dict(calls)
    greedy(model, PROMPT, 1)                           # the prefill and its token: no decode step
    short = {k: calls[k] - before[k] for k in calls}
    before = dict(calls)
    greedy(model, PROMPT, 2 * N_B + 1)                 # the same, then 2 n_b decode steps
    long = {k: calls[k] - before[k] for k in calls}
    per_two_blocks = {k: long[k] - short[k] for k in calls}
    assert per_two_blocks == {"graph": 2 * N_B, "run": 2 * N_B, "CompressedKV": 2 * N_B * 2 * layers,
                              "KVStore": 0, "to_json": 0, "flush": 2}, per_two_blocks
    assert counters["stats"]["unique_graphs"] == graphs      # nothing recompiled


def test_flattening_a_store_twice_gives_the_same_names_and_metadata(calls):
    x = torch.randn(1, 2, 40, 16)
    store = KVStore.from_prefill(x, CodecConfig(method="gear", bits=4), "k")
    first = compressed_kv.CompressedKV.of(store).__tensor_flatten__()
    written = calls["to_json"]
    second = compressed_kv.CompressedKV.of(store).__tensor_flatten__()
    assert second == first and calls["to_json"] == written
    assert first[0] == list(store.tensor_names()) and first[1][0] == store.config.to_json()
