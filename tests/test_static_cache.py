"""`generate(cache_implementation="static")` on a gear-compiled model
(`gear_compile.static`).

Specification: the cache comes back compressed (not transformers'
StaticCache left exact); method none equals eager generation with a real
StaticCache; every store is sized once, at prefill, for the whole generation
and never grows during decoding (fixed shapes), so the run compiles one
prefill and one decode graph; calls without "static" are untouched.
"""
import torch
from torch._dynamo.utils import counters

import gear_compile
from gear_compile.compressed_kv import CompressedKV
from gear_compile.hf_compat import cache_of
from gear_compile.models import tiny_model
from gear_compile.segment import Segment
from gear_compile.static import static_generate

from decoding import PROMPT

STEPS = 130         # beyond the default reservation (80 decode tokens at n_b 20): a dynamic run grows


def test_method_none_equals_eager_static_generation():
    with torch.no_grad():
        expected = tiny_model("llama").generate(PROMPT, max_new_tokens=30, do_sample=False,
                                                cache_implementation="static")
        model = gear_compile.compile(tiny_model("llama"), method="none", inductor=False)
        got = model.generate(PROMPT, max_new_tokens=30, do_sample=False, cache_implementation="static")
    assert torch.equal(got, expected)


def _resizes(monkeypatch):
    calls = []
    original = Segment.resized
    monkeypatch.setattr(Segment, "resized", lambda self, *a: calls.append(1) or original(self, *a))
    return calls


def test_a_static_generation_is_compressed_reserved_once_and_never_grows(monkeypatch):
    model = gear_compile.compile(tiny_model("llama"), method="gear", bits=4, inductor=False)
    model.generation_config.cache_implementation = "static"      # set in the config, as users do
    resizes = _resizes(monkeypatch)
    counters.clear()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True), torch.no_grad():
        out = model.generate(PROMPT, max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True)
    cache = cache_of(out)
    stores = [getattr(layer, name).store for layer in cache.layers for name in ("keys", "values")]
    assert all(isinstance(getattr(layer, n), CompressedKV) for layer in cache.layers for n in ("keys", "values"))
    assert len(resizes) == len(stores)                       # one reservation per store, at prefill
    assert all(s.capacity >= PROMPT.shape[1] + STEPS - s.counts()[0] for s in stores)
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    assert model.generation_config.cache_implementation == "static"    # the user's config is not changed


def test_without_static_the_store_grows_as_it_decodes(monkeypatch):
    model = gear_compile.compile(tiny_model("llama"), method="gear", bits=4, inductor=False)
    resizes = _resizes(monkeypatch)
    with torch.no_grad():
        model.generate(PROMPT, max_new_tokens=STEPS, do_sample=False)
    assert len(resizes) > 0


def test_another_cache_implementation_is_passed_on_as_given():
    seen = []
    model = gear_compile.compile(tiny_model("llama"), method="none", inductor=False)
    model.generate = static_generate(model, lambda *a, **kw: seen.append(kw))
    model.generate(PROMPT, max_new_tokens=3, cache_implementation="dynamic")
    assert seen == [dict(max_new_tokens=3, cache_implementation="dynamic")]
