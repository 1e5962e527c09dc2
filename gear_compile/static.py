"""`generate(cache_implementation="static")` on a model compiled by
`gear_compile.compile`: a compressed cache with one set of shapes.

What static-cache users want is a decode step whose shapes never change, so
that it is one graph (and, on CUDA, one CUDA graph under
mode="reduce-overhead"). transformers' StaticCache gets that by writing each
token into buffers it owns (`index_copy_`); those buffers are not graph
outputs, so the rewrite leaves them exact and reports it. The compressed
store has the same property once its decode capacity covers the whole
generation: its lengths live on the device, each token is an in-graph
write, and only the flush (once every n_b tokens) runs outside the graph.

So on a gear-compiled model, `cache_implementation="static"` (argument or
generation config) runs `generate` with a DynamicCache whose stores are
sized at prefill for prompt + max_new_tokens (`runtime.reserving`): no store
grows during the call and the decode step stays one static graph. Every
other `generate` call passes through untouched.
Neighbours: `runtime` (reserves at prefill), `gear_compile.compile` (installs
`static_generate`), `hf_compat` (the cache keyword).
"""
from __future__ import annotations

import copy
import functools
import logging

from .hf_compat import cache_kwarg
from .runtime import reserving

log = logging.getLogger("gear_compile")


def static_generate(model, generate):
    """`generate` with cache_implementation="static" mapped to a compressed,
    fully reserved cache."""

    @functools.wraps(generate)
    def run(*args, **kwargs):
        config = kwargs.get("generation_config") or model.generation_config
        requested = kwargs.get("cache_implementation") or config.cache_implementation
        if requested != "static":
            return generate(*args, **kwargs)       # any other cache_implementation is passed on as given
        from transformers import DynamicCache
        kwargs.pop("cache_implementation", None)
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise ValueError("gear: cache_implementation='static' sizes the cache from the prompt; "
                             "pass input_ids.")
        new = kwargs.get("max_new_tokens") or config.max_new_tokens
        total = ids.shape[-1] + new if new is not None else kwargs.get("max_length") or config.max_length
        log.info("gear: cache_implementation='static': a compressed cache reserved for %d tokens", total)
        kwargs.update(cache_kwarg(model, DynamicCache(config=model.config)))
        if "generation_config" in kwargs:
            kwargs["generation_config"] = copy.deepcopy(config)
            kwargs["generation_config"].cache_implementation = None
        default = model.generation_config.cache_implementation
        model.generation_config.cache_implementation = None      # transformers merges it in
        try:
            with reserving(total):
                return generate(*args, **kwargs)
        finally:
            model.generation_config.cache_implementation = default

    run._gear_original = generate
    return run
