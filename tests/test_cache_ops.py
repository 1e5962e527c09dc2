"""What generation does to a cache, done on the compressed store itself
(`compressed_kv.NATIVE`, `store.KVStore.batch_select / batch_repeat / cropped`).

Specification: beam reorders, batch selects and batch repeats keep the cache
compressed, give exactly what the same op gives on the dense reconstruction,
and copy the blocks rather than recompress them; a crop is exact in the
prefill block and the buffer, keeps whole decode blocks untouched and
re-opens the cut block into the buffer; other ops still run on the exact
reconstruction; beam search and speculative-style crops through a compiled
model keep the cache compressed within 3 graphs, and method none still
equals eager.
"""
import pytest
import torch
from torch._dynamo.utils import counters
from transformers import DynamicCache

import gear_compile
from gear_compile.compressed_kv import CompressedKV
from gear_compile.config import GearConfig
from gear_compile.hf_compat import cache_kwarg, cache_of
from gear_compile.models import tiny_model

from streams import filled_decode_parts, streamed
from decoding import PROMPT, chunks_and_crops_match

CONFIG = GearConfig(method="gear", bits=2, group_size=8, buffer_size=8, outlier_ratio=0.25)


def cache_tensor(batch=3, tokens=47, kind="k", config=CONFIG):
    x = torch.randn(batch, 2, tokens, 16, generator=torch.Generator().manual_seed(batch + tokens))
    return CompressedKV.of(streamed(x, config, kind, 13))


@pytest.mark.parametrize("op", [
    lambda t: t.index_select(0, torch.tensor([2, 0, 0])),
    lambda t: t[torch.tensor([1, 2]), ...],
    lambda t: t[torch.tensor([True, False, True]), ...],
    lambda t: t.repeat_interleave(2, dim=0)],
    ids=["beam-reorder", "select-long", "select-bool", "repeat"])
def test_batch_ops_keep_the_cache_compressed_and_equal_the_dense_op(op):
    kv = cache_tensor()
    out = op(kv)
    assert type(out) is CompressedKV and out.store.counts() == kv.store.counts()
    assert torch.equal(out.decompress(), op(kv.decompress()))
    # the blocks were copied, not recompressed: the first sequence's codes match its source's
    assert torch.equal(out.store.prefill.codes[0], kv.store.prefill.codes[int(op(torch.arange(3))[0])])


def test_a_reordered_cache_owns_its_buffer_and_lengths():
    kv = cache_tensor()
    out = kv.index_select(0, torch.tensor([0, 1, 2]))
    out.store.append(torch.ones(3, 2, 1, 16))
    assert len(out.store) == len(kv.store) + 1 and not torch.equal(out.store.buffer, kv.store.buffer)


def test_a_crop_in_the_buffer_or_the_prefill_block_is_exact():
    kv = cache_tensor()                                      # counts (8, 32, 7) with kivi n_b=8
    n_pre, n_dec, n_buf = kv.store.counts()
    dense = kv.decompress()
    for length in (n_pre + n_dec + 3, n_pre - 3):
        out = kv[..., :length, :]
        assert type(out) is CompressedKV and out.shape[2] == length
        assert torch.equal(out.decompress(), dense[:, :, :length])
    assert kv[..., :n_pre - 3, :].store.counts() == (n_pre - 3, 0, 0)


def test_a_crop_in_the_decode_blocks_reopens_only_the_cut_block():
    kv = cache_tensor()
    n_pre, n_dec, _ = kv.store.counts()
    length = n_pre + 13                                       # one whole block, 5 tokens of the next
    out = kv[..., :-(len(kv.store) - length), :]
    assert out.store.counts() == (n_pre, 8, 5)
    before = kv.decompress()[:, :, :length]                   # the reopened tokens' rebuilt values,
    held = out.store.buffer.dtype                             # exactly, as the buffer holds them
    assert torch.equal(out.decompress(), torch.cat([before[:, :, :n_pre + 8],
                                                    before[:, :, n_pre + 8:].to(held).float()], 2))
    kept = filled_decode_parts(out.store)
    reference = filled_decode_parts(kv.store)
    for name, block in kept.items():                          # the whole block is the same bytes
        assert torch.equal(block, reference[name][:, :, :block.shape[2]]), name
    out.store.append(torch.randn(3, 2, 10, 16))               # the re-opened block fills again
    assert out.store.counts() == (n_pre, 16, 7)
    for name, block in kept.items():
        assert torch.equal(filled_decode_parts(out.store)[name][:, :, :block.shape[2]], block), name


def test_other_ops_run_on_the_exact_reconstruction():
    kv = cache_tensor()
    for op in (lambda t: t.index_select(2, torch.tensor([0, 5])), lambda t: t[:, :, 1::2],
               lambda t: t.repeat_interleave(2, dim=2)):
        out = op(kv)
        assert type(out) is torch.Tensor and torch.equal(out, op(kv.decompress()))


def test_beam_search_keeps_a_lossy_cache_compressed_within_three_graphs():
    model = gear_compile.compile(tiny_model("llama"), method="gear", bits=4, inductor=False,
                                 buffer_size=8, sink_tokens=4)
    counters.clear()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True), torch.no_grad():
        out = model.generate(PROMPT, num_beams=3, max_new_tokens=20, do_sample=False,
                             return_dict_in_generate=True)
    cache = cache_of(out)
    assert all(isinstance(layer.keys, CompressedKV) and isinstance(layer.values, CompressedKV)
               for layer in cache.layers)
    assert counters["stats"]["unique_graphs"] <= 3, dict(counters["stats"])
    assert cache.layers[0].keys.store.counts() == (11, 16, 3)     # 11 + 19 tokens: 2 blocks of 8, 3 buffered
    assert cache.layers[0].keys.store.sink.shape[2] == 4


def test_beam_search_with_method_none_equals_eager():
    with torch.no_grad():
        expected = tiny_model("llama").generate(PROMPT, num_beams=3, max_new_tokens=12, do_sample=False)
        model = gear_compile.compile(tiny_model("llama"), method="none", inductor=False, buffer_size=8)
        got = model.generate(PROMPT, num_beams=3, max_new_tokens=12, do_sample=False)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("method", ["none", "kivi"])
def test_speculative_style_crops_keep_decoding_compressed(method):
    """Append 4 draft tokens, keep 1, roll back 3 (cache.crop), for 8 rounds:
    method none equals eager doing the same; kivi stays compressed."""
    options = dict(method=method, bits=2, group_size=8, buffer_size=8, inductor=False)
    model = gear_compile.compile(tiny_model("llama"), **options)
    reference = tiny_model("llama")
    caches = DynamicCache(config=model.config), DynamicCache(config=reference.config)
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(9))
    counters.clear()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True), torch.no_grad():
        outs = [m(input_ids=ids[:, :11], **cache_kwarg(m, c), use_cache=True).logits
                for m, c in zip((model, reference), caches)]
        for r in range(8):
            draft = ids[:, 11 + r:15 + r]
            outs = [m(input_ids=draft, **cache_kwarg(m, c), use_cache=True).logits
                    for m, c in zip((model, reference), caches)]
            for c in caches:
                c.crop(-3)
            if method == "none":
                torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)
    keys = caches[0].layers[0].keys
    assert isinstance(keys, CompressedKV) and len(keys.store) == 11 + 8
    assert counters["stats"]["unique_graphs"] <= 3, dict(counters["stats"])


def test_a_cache_cropped_before_its_first_multi_token_call_compiles():
    """A crop into the prefill block, then the first several-token call: its
    graph is traced with the cropped cache as input (a slice's view would be
    rebuilt by Dynamo from a fake store and fail)."""
    model = gear_compile.compile(tiny_model("llama"), method="none", buffer_size=8, inductor=False)
    ids = torch.randint(0, 256, (1, 19), generator=torch.Generator().manual_seed(3))
    keys = chunks_and_crops_match(model, tiny_model("llama"), ids).layers[0].keys
    assert isinstance(keys, CompressedKV) and keys._base is None and len(keys.store) == 13


def test_one_model_serves_many_generate_calls_padded_batches_and_batch_changes():
    """One compiled model, a lossy method: generate on a left-padded batch of 2
    (attention mask), then a batch of 3, then 1, then the padded batch again.
    Every call keeps its cache compressed, the padded row decodes as it does
    alone (its padding masked, not attended), and the whole sequence stays
    within 3 graphs per input shape class: prefill and decode, for batch 1
    and for a dynamic batch."""
    model = gear_compile.compile(tiny_model("llama"), method="gear", bits=4, inductor=False,
                                 buffer_size=8)
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 256, (2, 21), generator=gen)
    mask = torch.ones_like(ids)
    ids[1, :6], mask[1, :6] = 0, 0
    counters.clear()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True), torch.no_grad():
        runs = []
        for batch, batch_mask in ((ids, mask), (torch.randint(1, 256, (3, 17), generator=gen), None),
                                  (ids[1:, 6:], None), (ids, mask)):
            out = model.generate(batch, attention_mask=batch_mask, max_new_tokens=20,
                                 do_sample=False, return_dict_in_generate=True)
            cache = cache_of(out)
            assert all(isinstance(layer.keys, CompressedKV) and isinstance(layer.values, CompressedKV)
                       for layer in cache.layers)
            assert len(cache.layers[0].keys.store) == batch.shape[1] + 19
            runs.append(out.sequences)
    assert counters["stats"]["unique_graphs"] <= 6, dict(counters["stats"])
    assert torch.equal(runs[0], runs[3])                      # the same call twice: the same tokens
    # the padded row, alone and unpadded, begins with the same greedy tokens
    # (GEAR-4 compresses differently placed blocks, so only the first tokens must agree)
    assert torch.equal(runs[2][0, 15:20], runs[0][1, 21:26])
