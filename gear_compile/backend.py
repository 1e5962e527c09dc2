"""The `gear` torch.compile backend.

    torch.compile(model.forward, backend="gear", options={"method": "gear", "bits": 4})

For each graph Dynamo captures: find attention sites (`passes.sites`), rewrite
the rewritable ones into gear ops (`passes.rewrite`), record a report with the
before/after code and their diff, then lower the rewritten graph with Inductor
(`compile_fx`) or, with inductor=False, with AOT autograd and no codegen. The
returned function is `runtime.wrap`'s: it flattens CompressedKV inputs into
their inner tensors, and turns the stores the graph produced or updated back
into CompressedKV outputs (flushing full buffers), which Dynamo stores in
the cache.
Neighbours: `config` (options), `passes` (match/rewrite), `report` (what was
done), `runtime` (between calls), `ops` (the custom ops).
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import pathlib

import torch
import torch.fx as fx

from . import codec, ops  # noqa: F401  (ops registers the gear ops)
from .config import GearConfig
from .passes import lorc as lorc_pass
from .passes import mla as mla_pass
from .passes.sites import find_sites
from .passes.pattern import example_value
from .passes.rewrite import RewritePlan, TensorOut, rewrite
from .report import GraphReport, record
from .runtime import wrap

log = logging.getLogger("gear_compile")

DUMP_ENV = "GEAR_COMPILE_DUMP_DIR"


def gear_backend(gm: fx.GraphModule, example_inputs, options: dict | None = None,
                 mode: str | None = None, **_ignored):
    """Dynamo backend entry point (registered as "gear"). `mode` (torch.compile's,
    or generate's CompileConfig's) selects Inductor's options as it would for
    the default backend, e.g. CUDA graphs for "reduce-overhead"."""
    sites = find_sites(gm.graph)
    config = _for_sites(GearConfig.from_options(options), sites)
    unfit = []
    for site in sites:
        if site.rewritable and (reason := codec.unfit(config, site.head_dim)):
            site.rewritable, site.reason = False, reason
            unfit.append(site)
    if unfit and not any(s.rewritable for s in sites):
        # the options leave nothing compressed: a user who asked for compression must hear it
        log.warning("gear: the options leave every attention site of this graph uncompressed "
                    "(%d sites): %s", len(unfit), unfit[0].reason)
    lorc_sites = _lorc_sites(gm, sites, example_inputs, config) if config.lorc else {}
    mla_forms = mla_pass.annotate([s for s in sites if s.index not in lorc_sites]) if config.mla_absorb else {}
    mla_pass.leave_windows_exact(sites, mla_forms)
    for site in sites:
        if site.key is not None and site.key.compressed and site.index not in lorc_sites and \
                any(example_value(a.past).store.logical is not None for a in (site.key, site.value)):
            raise RuntimeError(
                f"gear: {site.layer}'s cache holds LoRC latents but this graph cannot rebuild them "
                f"({site.reason or 'options without lorc'}); generate with the options the cache was made with")
    new_gm, plan = gm, RewritePlan(inputs=[None] * len(example_inputs), outputs=[TensorOut()] * _num_outputs(gm))
    compiled = None
    if any(s.rewritable for s in sites):
        try:
            new_gm, plan = rewrite(gm, sites, config, lorc_sites, mla_forms)
            compiled = _lower(new_gm, plan.compile_inputs(new_gm, example_inputs), config, mode)
        except Exception as e:       # noqa: BLE001 - a site we cannot handle falls back, never raises
            if any(s.key is not None and s.key.compressed for s in sites if s.rewritable):
                raise                # a compressed cache cannot be read exactly by the stock graph
            log.warning("gear: graph left exact: its rewrite does not compile (%s: %s)", type(e).__name__, e)
            for site in (s for s in sites if s.rewritable):
                site.rewritable = False
                site.reason = f"the rewritten graph does not compile ({type(e).__name__}: " \
                              f"{str(e).splitlines()[0][:120]}); left exact"
            new_gm, plan = gm, RewritePlan(inputs=[None] * len(example_inputs),
                                           outputs=[TensorOut()] * _num_outputs(gm))
    absorbed = frozenset(s.index for s in sites if s.index in mla_forms and s.key.compressed)   # decode graphs'
    graph_report = GraphReport.build(gm, new_gm, sites, config, absorbed)
    record(graph_report)
    log.info("gear: graph %d: %s", graph_report.index, graph_report.summary())
    for site in sites:
        log.debug("gear:   %s [%s] %s: %s", site.layer, site.form,
                  "rewritten" if site.rewritable else "fallback", site.reason)
    dump_dir = config.dump_graphs or os.environ.get(DUMP_ENV)
    if dump_dir:
        path = graph_report.write(dump_dir)
        log.info("gear: graph diff written to %s", path)
    if compiled is None:
        compiled = _lower(new_gm, plan.compile_inputs(new_gm, example_inputs), config, mode)
    return wrap(compiled, plan, config)


def _for_sites(config: GearConfig, sites) -> GearConfig:
    """The options for this graph's heads (`GearConfig.for_head_dim`, by the
    smallest head dim: one choice for every store of the graph, as a decode
    graph reading them makes it again)."""
    dims = [site.head_dim for site in sites if site.rewritable and site.head_dim]
    return config.for_head_dim(min(dims)) if dims else config


def _lorc_sites(gm: fx.GraphModule, sites, example_inputs, config: GearConfig) -> dict:
    """{site index: LoRCSite} for the rewritable sites LoRC applies to, with
    ranks and factors planned from the weights; the others say why not."""
    found = []
    for site in (s for s in sites if s.rewritable):
        lo = lorc_pass.find(site)
        if isinstance(lo, str):
            site.reason += f"; LoRC not applied: {lo}"
        else:
            found.append((site, lo))
    widths = {(lo.heads, lo.head_dim) for _, lo in found}
    if len(widths) > 1:          # the rank schedule shares one budget over layers of one K/V width
        for site, _ in found:
            site.reason += f"; LoRC not applied: layers of this graph differ in K/V width {sorted(widths)}"
        return {}
    if found:
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        schedule = lorc_pass.plan(found, dict(zip(placeholders, example_inputs)), config)
        full = found[0][1].heads * found[0][1].head_dim
        for site, lo in found:
            site.reason += (f"; LoRC ranks K {lo.key.rank} / V {lo.value.rank} of {full} ({schedule} "
                            f"schedule, {config.lorc_sinks} exact sinks)")
    return {site.index: lo for site, lo in found}


def _num_outputs(gm: fx.GraphModule) -> int:
    output = next(n for n in gm.graph.nodes if n.op == "output")
    return len(output.args[0])


def _lower(gm: fx.GraphModule, example_inputs, config: GearConfig, mode: str | None = None):
    # Inductor's and AOT autograd's on-disk caches key a graph by its code and
    # input metadata, not by what our custom ops do: the shapes and count of
    # kv_prefill's outputs come from our fake implementations. Tag the key with
    # our sources so an edited or upgraded gear_compile never runs code that
    # was compiled against another version of its ops.
    tag = "-".join(t for t in (torch.compiler.config.cache_key_tag, "gear_compile:" + source_hash()) if t)
    with torch.compiler.config.patch(cache_key_tag=tag):
        if config.inductor:
            from torch._inductor import list_mode_options
            from torch._inductor.compile_fx import compile_fx
            from torch.torch_version import TorchVersion
            # No size asserts: a decode graph takes every inner tensor of every
            # layer's store as an input (~900 for a 30-layer model), which
            # Dynamo's guards have already checked; Inductor's wrapper would
            # re-assert each one with a Python call at every step.
            patches = dict(list_mode_options(mode) if mode else {}, size_asserts=False)
            if TorchVersion(torch.__version__) < (2, 13):     # a version comparison, not a string one
                # torch 2.11's vectorised C++ bounds check of the decode graph's
                # buffer write names a temporary it never declares (the compile
                # fails); 2.13 is fine, 2.12 untested. The write's position is
                # the store's own length, kept below the buffer's size by the runtime.
                patches["assert_indirect_indexing"] = False
            return compile_fx(gm, example_inputs, config_patches=patches)
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
