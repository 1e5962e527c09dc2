"""The decode methods the end-to-end benchmarks compare, and how each is set up.

`METHODS` names each method (dense eager or Inductor, GEAR and KIVI through
the `gear` backend, LoRC, transformers' quanto QuantizedCache, a static cache
with CUDA graphs); `setup(model, method, device)` prepares a model for one and
returns a function making a fresh cache; `cache_bytes` counts what a cache
holds; `own_forward` gives a model a forward code object of its own, so
side-by-side runs keep their Dynamo caches apart.
Neighbours: generate_throughput (one process per run, side by side), tp_decode
(tensor-parallel ranks), decode_step_profile (profiled steps).
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).parent
METHODS = {
    "dense-eager": None,
    "dense-inductor": "inductor",
    "gear4": dict(method="gear", bits=4),
    "gear4-kcvt": dict(method="gear", bits=4, backbone="kcvt"),
    "gear4-nosinks": dict(method="gear", bits=4, sink_tokens=0),
    "gear2": dict(method="gear", bits=2),
    "kivi2": dict(method="kivi", bits=2),
    "quanto4": {"peer": 4},
    "lorc30": dict(method="none", lorc=0.3),
    "gear4-lorc30": dict(method="gear", bits=4, lorc=0.3),
    "dense-static": "static",          # StaticCache + torch.compile(mode="reduce-overhead") (--graphs)
}


def setup(model, method: str, device: str):
    """Prepare `model` for `method`; returns a function making a fresh cache."""
    import torch
    from transformers import DynamicCache

    import gear_compile
    options = METHODS[method]
    if options == "inductor":
        model.forward = torch.compile(model.forward)
    elif options == "static":
        from transformers import StaticCache
        model.forward = torch.compile(model.forward, mode="reduce-overhead")
        return lambda max_cache_len: StaticCache(config=model.config, max_cache_len=max_cache_len)
    elif isinstance(options, dict) and "peer" in options:
        sys.path.insert(0, str(HERE))
        from quality_methods import ensure_peer
        ensure_peer()
        from transformers import QuantizedCache
        return lambda: QuantizedCache(backend="quanto", config=model.config, nbits=options["peer"])
    elif options is not None:
        if options.get("lorc"):
            sys.path.insert(0, str(HERE))
            import quality_data as qd
            from transformers import AutoTokenizer

            from gear_compile.models import SMOLLM2_GGUF, smollm2_dir
            tokenizer = AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF)
            gear_compile.lorc.calibrate(model, qd.Corpus(tokenizer, False).passage("dev", 2048))
        gear_compile.compile(model, **options)
    return lambda: DynamicCache(config=model.config)


def cache_bytes(cache, method: str) -> int:
    import gear_compile
    if isinstance(METHODS[method], dict) and "peer" in METHODS[method]:
        sys.path.insert(0, str(HERE))
        from quality_methods import tensor_bytes
        return sum(tensor_bytes(getattr(layer, n, None)) for layer in cache.layers
                   for n in ("_quantized_keys", "_quantized_values", "keys", "values"))
    return gear_compile.kv_bytes(cache)


def own_forward(model):
    """Give `model` a forward whose code object is its own, so that Dynamo
    keeps its compiled code apart from other models' (side-by-side runs
    would otherwise walk each other's cache entries and guards)."""
    import types
    fn = model.forward.__func__
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__,
                              fn.__defaults__, fn.__closure__)
    copy.__dict__.update(fn.__dict__)
    model.forward = types.MethodType(copy, model)
