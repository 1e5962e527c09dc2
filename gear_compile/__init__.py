"""gear-compile: KV-cache compression (GEAR) as a torch.compile backend.

The whole user surface:

    model.forward = torch.compile(model.forward, backend="gear", options={...})
    gear_compile.compile(model, method="gear", bits=4)     # the same, one call
    gear_compile.explain(model, input_ids, method="gear")  # what gets rewritten
    gear_compile.kv_bytes(cache)                           # bytes actually held
    gear_compile.kv_breakdown(cache)                       # ... used vs reserved, by kind
    gear_compile.lorc.calibrate(model, input_ids)          # before compiling with lorc > 0

Options are documented on `GearConfig`.

Glossary (one name each, used through the package, tests and benchmarks):
  block      n_b tokens compressed together (`block_size`; the option is
             `buffer_size`, as the paper's streaming buffer holds one block)
  buffer     the exact newest tokens of a store, at most one block
  backbone   the quantizer under GEAR (`quantizer`: kcvt, kivi, per_token)
  group      g tokens (channel-axis stats) or channels (token-axis stats)
             sharing one (scale, zero)
  outliers   the sparse part: `outlier_ratio` s of each vector, s/2 a side
  low rank   L = A B^T of a block's residual, rank r_p (prefill) / r_g (decode)
  segment    uniformly compressed blocks (`segment`): the prefill block, or
             the decode blocks; a store is two segments, a buffer, its sinks
             and lengths
  parts      the stored tensors of a segment (codes, scale, zero, lr_*, out_*)
  sinks      a store's first tokens held exact (`sink_tokens`, `lorc_sinks`)
  sink logits  a model's per-head extra softmax logit, no value (`sink_logits`)
  dequantize  quantization codes -> values (`quantize.dequantize`, the kernels)
  decompress  a segment, store or cache -> its dense tensor (`KVStore.decompress`)
  codec      the options resolved for one head dim (`codec.Codec`)
  rotated    a store holding x R, R an orthogonal per-head rotation (`rotate`)

Modules: `config` (options), `codec` (options resolved for a head dim),
`packing`/`quantize`/`outliers`/`lowrank`/`segment` (the codec), `rotation` (the
`rotate` option), `store`
(a layer's K or V store and its layout), `compressed_kv` (the cache tensor),
`ops` (custom ops), `lorc` (low-rank K/V projections), `passes` (match, rewrite, LoRC), `backend` (the
torch.compile backend), `runtime` (between graph calls: counts, flushes),
`report`, `graph_diff` and `explain` (inspection), `kernels` (attention over packed codes:
C++ on CPU, Triton on CUDA), `cli` (`gear-compile inspect`).
"""
from __future__ import annotations

from . import lorc
from .backend import gear_backend
from .compressed_kv import CompressedKV, KVBytes, dense_bytes, kv_breakdown, kv_bytes
from .config import GearConfig
from .explain import explain

__all__ = ["compile", "explain", "lorc", "kv_bytes", "kv_breakdown", "KVBytes", "dense_bytes", "gear_backend",
           "GearConfig", "CompressedKV"]
__version__ = "0.1.0"


def compile(model, dynamic: bool | None = None, **options):
    """Compile `model.forward` with the gear backend so that `model(...)` and
    `model.generate(...)` use a compressed KV cache; returns the model.

    (`torch.compile(model)` wraps `__call__` only: transformers' `generate`
    calls `model.forward` through its own paths, so the forward itself must be
    compiled, which is what this does.) Options: see `GearConfig`; they are
    validated here, before any compile. `generate(cache_implementation=
    "static")` then runs with a compressed cache reserved for the whole
    generation (fixed shapes: see `static`).

    Calls run with Dynamo's C++ symbolic-shape guards: a decode graph takes
    every layer's store as inputs whose capacity is dynamic, and checking
    their shape relations in Python is a large share of each step's cache
    lookup for a 30-layer model; in C++ a fraction of it.
    (`torch.compile(..., backend="gear")` users get the same by setting
    `torch._dynamo.config.enable_cpp_symbolic_shape_guards = True`.)
    """
    import functools

    import torch
    config = GearConfig.from_options(options)
    if config.lorc and config.lorc_basis == "calibrated":
        lorc.require_calibration(list(model.parameters()))     # before compiling, not at the first call
    original = getattr(model.forward, "_torchdynamo_orig_callable", model.forward)
    compiled = torch.compile(original, backend="gear", dynamic=dynamic, options=config.as_options())

    @functools.wraps(original)
    def forward(*args, **kwargs):
        with torch._dynamo.config.patch(enable_cpp_symbolic_shape_guards=True):
            return compiled(*args, **kwargs)

    forward._torchdynamo_orig_callable = original     # compile() again starts from it
    model.forward = forward
    if hasattr(model, "generate"):
        from .static import static_generate
        model.generate = static_generate(model, getattr(model.generate, "_gear_original", model.generate))
    return model

