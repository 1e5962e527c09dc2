"""The `gear` torch.compile backend.

    torch.compile(model.forward, backend="gear", options={"method": "gear", "bits": 4})

For each graph Dynamo captures: find attention sites (`passes.match`), rewrite
the rewritable ones into gear ops (`passes.rewrite`), record a report with the
before/after code and their diff, then lower the rewritten graph with Inductor
(`compile_fx`) or, with inductor=False, with AOT autograd and no codegen. At run
time the returned function flattens CompressedKV inputs into their inner
tensors and wraps the stores produced or updated by the graph back into
CompressedKV outputs, which Dynamo stores in the cache.
Neighbours: `config` (options), `passes` (match/rewrite), `report` (what was
done), `compressed_kv` (the cache tensors), `ops` (the custom ops).
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import pathlib

import torch
import torch.fx as fx

from . import ops  # noqa: F401  (registers the gear ops)
from .compressed_kv import CompressedKV, KVStore
from .config import GearConfig
from .passes.match import find_sites
from .passes.rewrite import RewritePlan, rewrite
from .report import GraphReport, record

log = logging.getLogger("gear_compile")

DUMP_ENV = "GEAR_COMPILE_DUMP_DIR"


def gear_backend(gm: fx.GraphModule, example_inputs, options: dict | None = None,
                 mode: str | None = None, **_ignored):
    """Dynamo backend entry point (registered as "gear"). `mode` (as passed by
    generate's CompileConfig) is accepted and has no effect."""
    config = GearConfig.from_options(options)
    sites = find_sites(gm.graph)
    if any(s.rewritable for s in sites):
        new_gm, plan = rewrite(gm, sites, config)
    else:
        new_gm, plan = gm, RewritePlan(inputs=[None] * len(example_inputs),
                                       outputs=[("tensor",)] * _num_outputs(gm))
    graph_report = GraphReport.build(gm, new_gm, sites, config)
    record(graph_report)
    log.info("gear: graph %d: %s", graph_report.index, graph_report.summary())
    for site in sites:
        log.debug("gear:   %s [%s] %s: %s", site.layer, site.form,
                  "rewritten" if site.rewritable else "fallback", site.reason)
    dump_dir = config.dump_graphs or os.environ.get(DUMP_ENV)
    if dump_dir:
        path = graph_report.write(dump_dir)
        log.info("gear: graph diff written to %s", path)
    compiled = _lower(new_gm, plan.flatten_inputs(example_inputs), config)
    return _runtime(compiled, plan, config)


def _num_outputs(gm: fx.GraphModule) -> int:
    output = next(n for n in gm.graph.nodes if n.op == "output")
    return len(output.args[0])


def _lower(gm: fx.GraphModule, example_inputs, config: GearConfig):
    # Inductor's and AOT autograd's on-disk caches key a graph by its code and
    # input metadata, not by what our custom ops do: the shapes and count of
    # kv_prefill's outputs come from our fake implementations. Tag the key with
    # our sources so an edited or upgraded gear_compile never runs code that
    # was compiled against another version of its ops.
    tag = "-".join(t for t in (torch.compiler.config.cache_key_tag, "gear_compile:" + source_hash()) if t)
    with torch.compiler.config.patch(cache_key_tag=tag):
        if config.inductor:
            from torch._inductor.compile_fx import compile_fx
            return compile_fx(gm, example_inputs)
        from torch._dynamo.backends.debugging import aot_eager
        return aot_eager(gm, example_inputs)


@functools.lru_cache(maxsize=1)
def source_hash() -> str:
    """A short hash of every source file of the package."""
    digest = hashlib.sha256()
    root = pathlib.Path(__file__).parent
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _runtime(compiled, plan: RewritePlan, config: GearConfig):
    """Adapts Dynamo's calling convention to the rewritten graph's."""
    # Decode room kept free after every call: a one-token step flushes at most
    # one block. Appending more tokens at once needs decode_capacity >= them.
    reserve = config.block_size

    def run(*args):
        results = compiled(*plan.flatten_inputs(args))
        out, i = [], 0
        for spec in plan.outputs:
            if spec[0] == "tensor":
                out.append(results[i])
                i += 1
            elif spec[0] == "prefill":
                _, kind, n = spec
                store = KVStore.from_tensors(config, kind, list(results[i:i + n]))
                i += n
                out.append(_dynamic(CompressedKV(store.grow(reserve))))
            else:   # decode: the input store was updated in place
                store = args[spec[1]].store
                out.append(_dynamic(CompressedKV(store.grow(reserve))))
        return out

    return run


def _dynamic(kv: CompressedKV) -> CompressedKV:
    """Tell Dynamo that the sizes that grow (the logical length, the decode
    capacity) are dynamic from the first decode graph on, so neither decoding
    nor capacity growth recompiles."""
    torch._dynamo.maybe_mark_dynamic(kv, 2)
    for name, tensor in zip(kv.store.tensor_names(), kv.store.tensors()):
        if name.startswith("d_") and tensor.shape[2] > 1:
            torch._dynamo.maybe_mark_dynamic(tensor, 2)
    return kv
