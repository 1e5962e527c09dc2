"""The transformers releases we support, in one place (5.17 to the newest 5.x).

From 5.2x a model's forward and its outputs call the KV cache `cache`;
`past_key_values` still works there with a deprecation warning (removal
announced for 5.40) and is the only name in earlier releases. Code that
calls a model directly passes `**cache_kwarg(model, cache)` and reads
`cache_of(output)`; `generate` users need neither.
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
