"""Sliding-window layers (DynamicSlidingWindowLayer: the cache keeps the last
W - 1 tokens, attention sees them and the new ones through a windowed mask).

Specification: such a layer is rewritten, not left exact; its cache stays
compressed through generate; method none reproduces eager tokens whether the
prompt is shorter or longer than the window, with eager or SDPA attention and
a left-padded batch; the store drops whole blocks as they leave the window
(never recompressing) so it holds at most about 1.25 W + 2 n_b tokens; the
tokens it still holds beyond the window are hidden from attention; and the
run compiles no more graphs than Dynamo does for the dense model.
"""
import pytest
import torch
import transformers as tf
from torch._dynamo.utils import counters

import gear_compile
from gear_compile.compressed_kv import CompressedKV
from gear_compile.config import GearConfig
from gear_compile.hf_compat import cache_of
from gear_compile.models import tiny_model
from gear_compile.store import KVStore

from decoding import decode_logits, greedy
from streams import streamed

WINDOW = 16


def windowed_model(attn="sdpa"):
    return tiny_model("mistral", sliding_window=WINDOW, attn_implementation=attn)


def generate(model, ids, mask=None, steps=50):
    return greedy(model, ids, steps, attention_mask=mask)


@pytest.mark.parametrize("attn,prompt", [("sdpa", 30), ("sdpa", 7), ("eager", 30)])
def test_method_none_reproduces_eager_tokens_and_keeps_the_cache_compressed(attn, prompt):
    ids = torch.randint(1, 256, (2, prompt), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    expected = generate(windowed_model(attn), ids, mask).sequences
    counters.clear()
    dense = windowed_model(attn)                # the graphs Dynamo needs for the dense cache
    dense.forward = torch.compile(dense.forward, backend="aot_eager")
    generate(dense, ids, mask)
    dense_graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    counters.clear()
    model = gear_compile.compile(windowed_model(attn), method="none", buffer_size=4, inductor=False)
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        out = generate(model, ids, mask)
    assert torch.equal(out.sequences, expected)
    assert counters["stats"]["unique_graphs"] <= dense_graphs, (counters["stats"], dense_graphs)
    for layer in cache_of(out).layers:
        assert isinstance(layer.keys, CompressedKV) and isinstance(layer.values, CompressedKV)
        assert layer.keys.shape[2] == WINDOW - 1                 # what the dense layer holds
        assert len(layer.keys.store) <= 1.25 * (WINDOW - 1) + 2 * 4


def test_inductor_lowers_windows_not_yet_full_beside_full_attention_layers():
    config = tf.Gemma2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=WINDOW)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).eval()     # sliding and full layers alternate
    # the sliding caches' length, shorter than the window, is a size symbol only their flattened
    # CompressedKV inputs bound: the rewrite passes it as an input of its own (rewrite.Flattened)
    report = gear_compile.explain(model, torch.randint(1, 256, (1, 7)), method="none", inductor=True)
    assert report.sites and all(s.rewritten for s in report.sites)


def test_every_site_is_rewritten_with_its_window():
    report = gear_compile.explain(windowed_model(), torch.randint(0, 256, (1, 20)),
                                  method="gear", bits=4)
    sites = report.sites
    assert len(sites) == 4 and all(s.rewritten for s in sites), report
    assert all("sliding window keeping 15 tokens" in s.reason for s in sites)


def test_gear_8bit_logits_stay_close_to_eager_past_the_window():
    expected, _ = decode_logits(windowed_model(), steps=40)
    model = gear_compile.compile(windowed_model(), method="gear", bits=8, buffer_size=4,
                                 inductor=False)
    got, cache = decode_logits(model, steps=40)
    assert isinstance(cache.layers[0].keys, CompressedKV)
    err = (got - expected).norm() / expected.norm()
    assert err < 0.02, f"8-bit GEAR logits relative error {err:.4f}"


def test_forget_drops_whole_blocks_and_keeps_the_newest_tokens_exactly():
    config = GearConfig(method="gear", bits=4, group_size=16, buffer_size=4)
    x = torch.randn(1, 2, 70, 16, generator=torch.Generator().manual_seed(1))
    prompt = KVStore.from_prefill(x[:, :, :10], config, "k", streamed=True)
    assert prompt.counts() == (0, 8, 2)                        # two whole blocks, two buffered
    store = streamed(x, config, "k", 10, streamed=True)
    before, codes, (_, held, _) = store.decompress(), store.decode.codes.clone(), store.counts()
    store.forget(15)
    n_pre, n_dec, n_buf = store.counts()
    assert n_pre == 0 and n_dec % 4 == 0 and 15 <= n_dec + n_buf <= 1.25 * 15 + 4 + 4
    assert store.lengths.tolist() == [n_pre, n_dec, n_buf]
    assert torch.equal(store.decompress(), before[:, :, -(n_dec + n_buf):])   # moved, not recompressed
    dropped = held - n_dec                                     # whole blocks gone from the front
    assert torch.equal(store.decode.codes[:, :, :n_dec], codes[:, :, dropped:dropped + n_dec])
