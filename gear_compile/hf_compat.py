"""The transformers releases we support, in one place (5.17 to the newest 5.x).

From 5.2x a model's forward and its outputs call the KV cache `cache`;
`past_key_values` still works there with a deprecation warning (removal
announced for 5.40) and is the only name in earlier releases. Code that
calls a model directly passes `**cache_kwarg(model, cache)` and reads
`cache_of(output)`; `generate` users need neither.

A model's KV heads and head dim are read here too (`num_kv_heads`,
`head_dim`): transformers' own helpers for them moved between releases
(`continuous_batching.cache` in 5.17, `continuous_batching.utils` later).
`serving` subclasses transformers' continuous-batching cache, whose hooks
took their present form in 5.19: `serving_unsupported()` says what an older
release lacks (`serving.enable` raises it, its tests skip on it).
Neighbours: `explain` (runs a prefill and a decode step), `models`.
"""
from __future__ import annotations

import functools
import inspect


@functools.lru_cache(maxsize=None)
def _cache_name(forward) -> str:
    parameters = inspect.signature(forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def cache_kwarg(model, cache) -> dict:
    """{'cache': cache} where the model's forward takes that keyword, else
    {'past_key_values': cache}."""
    # a compiled forward keeps the model's bound method; key the cache on its function
    forward = getattr(model.forward, "_torchdynamo_orig_callable", model.forward)
    return {_cache_name(getattr(forward, "__func__", forward)): cache}


def cache_of(output):
    """The cache a forward or `generate` output returns, under either name."""
    fields = output.keys() if hasattr(output, "keys") else ()
    return output["cache"] if "cache" in fields else output.past_key_values


def num_kv_heads(config) -> int:
    """A (text) config's KV heads: `num_key_value_heads`, else
    `num_attention_heads` (no GQA), as transformers' continuous batching reads them."""
    for name in ("num_key_value_heads", "num_attention_heads"):
        if getattr(config, name, None) is not None:
            return getattr(config, name)
    raise ValueError(f"num_key_value_heads or num_attention_heads could not be found in the config:\n{config}")


def head_dim(config) -> int:
    """A (text) config's head dim: `head_dim`, else hidden_size // num_attention_heads."""
    if getattr(config, "head_dim", None) is not None:
        return config.head_dim
    hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    if hidden is not None and heads is not None:
        return hidden // heads
    raise ValueError(f"head_dim or (hidden_size and num_attention_heads) could not be found in the config:\n{config}")


# the PagedAttentionCache methods `serving.GearPagedCache` overrides or calls (5.18 on)
_PAGED_HOOKS = ("can_store_request_tokens", "extend_read_and_write_indices", "free_blocks",
                "free_all_requests", "prepare_fork_request", "compute_free_capacity", "count_storable_requests")


def serving_unsupported() -> str | None:
    """None where this transformers' continuous batching has the hooks
    `serving` relies on (5.19 to the newest 5.x); else what it lacks, as a
    sentence. A probe of the API itself, not of the version number."""
    import dataclasses

    import transformers
    from transformers import ContinuousBatchingConfig
    from transformers.generation.continuous_batching import cache, continuous_api

    paged = cache.PagedAttentionCache
    missing = [f"PagedAttentionCache.{name}" for name in _PAGED_HOOKS if not hasattr(paged, name)]
    if list(inspect.signature(paged.update).parameters)[4:] != ["kwargs"]:
        missing.append("PagedAttentionCache.update(key_states, value_states, layer_idx, kwargs)")
    if "page_size" not in {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}:
        missing.append("ContinuousBatchingConfig.page_size")
    if not hasattr(continuous_api.ContinuousBatchingManager, "_create_batch_processor"):
        missing.append("ContinuousBatchingManager._create_batch_processor")
    if not missing:
        return None
    return (f"gear_compile.serving needs transformers' continuous batching of 5.19 or newer: "
            f"transformers {transformers.__version__} lacks {', '.join(missing)}")
