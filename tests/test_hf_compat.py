"""hf_compat: what differs between the supported transformers releases
(5.17 to the newest 5.x), probed and answered in one place."""
import inspect

import pytest
import torch
import transformers as tf
from transformers.generation.continuous_batching import cache as cb_cache

from gear_compile import hf_compat


def test_kv_heads_and_head_dim_as_transformers_reads_them():
    """num_key_value_heads else num_attention_heads; head_dim else hidden_size / heads
    (transformers' own helpers moved from continuous_batching.cache to .utils after 5.17)."""
    gqa = tf.LlamaConfig(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=48)
    assert (hf_compat.num_kv_heads(gqa), hf_compat.head_dim(gqa)) == (2, 48)
    plain = tf.GPT2Config(n_embd=96, n_head=4)
    assert (hf_compat.num_kv_heads(plain), hf_compat.head_dim(plain)) == (4, 24)


def _older_update(self, key_states, value_states, layer_idx, read_index, write_index):
    """transformers 5.17-5.18's signature."""


def test_serving_refuses_a_transformers_without_its_hooks(monkeypatch):
    """On transformers 5.17-5.18 (no admission hooks, update(..., read_index,
    write_index)) serving.enable raises a sentence naming what is missing and
    the release it needs, before touching the model; here the older cache is mimicked."""
    from gear_compile import serving
    monkeypatch.setattr(cb_cache.PagedAttentionCache, "update", _older_update)
    monkeypatch.delattr(cb_cache.PagedAttentionCache, "compute_free_capacity", raising=False)
    why = hf_compat.serving_unsupported()
    assert why is not None and "5.19 or newer" in why and tf.__version__ in why
    assert "PagedAttentionCache.compute_free_capacity" in why and "update(" in why
    with pytest.raises(RuntimeError, match="5.19 or newer"):
        serving.enable(torch.nn.Linear(1, 1), kv_budget_bytes=1 << 20)


def test_serving_probe_matches_the_installed_cache():
    """The probe answers None exactly where transformers' paged cache has
    every hook serving overrides and the kwargs-style update."""
    paged = cb_cache.PagedAttentionCache
    has_all = (all(hasattr(paged, name) for name in hf_compat._PAGED_HOOKS)
               and list(inspect.signature(paged.update).parameters)[-1] == "kwargs")
    assert (hf_compat.serving_unsupported() is None) == has_all
