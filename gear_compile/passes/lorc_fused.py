"""LoRC's fused decode attention: whether a LoRC decode site runs as one
fused op over its latent stores, and the op the rewrite emits for it.

The op is `gear::lorc_attention_cpu` (kernels/cpu_lorc_attention.h) on a
CPU or `gear::lorc_attention_triton` (kernels/lorc_decode.py) on CUDA,
picked by `fused_kernel`. Per tile, the latent codes are dequantized in
registers, multiplied by each KV head's U^T, rotated with the past's
cos/sin (the graph's own RoPE nodes replayed once per graph at the past's
positions, rows of their own), and scored by the head's query heads; V is
attended as latents and up-projected once. No whole-store decompression is
left in the step. RoPE forms: rotate-half and interleaved, partial rotary
(`lorc.RopeForm`, found by running the rotation on a probe).

`choose_fused` decides per site and writes the path into its reason. The
replay path (`passes.lorc`) stays for what the kernels do not cover: another
device or kernel option, latents too wide for the Triton kernel, attention
that is not plain, a rotating codec, another rotation. `explain` says which
path each site's K takes, and why.
Neighbours: `passes.lorc` (the sites, latents and the replay path),
`passes.rewrite` (calls `choose_fused` and `emit_fused`), the two kernels.
"""
from __future__ import annotations

import operator
import os

import torch
import torch.fx as fx

from ..config import GearConfig
from .lorc import LoRCSite, RopeForm, folds_values, latent, replay
from .match import AttentionSite
from .pattern import example_value

# GEAR_LORC_FUSED=0 keeps the replay path everywhere (the tests compare the two).
FUSED = os.environ.get("GEAR_LORC_FUSED", "1") != "0"


def choose_fused(site: AttentionSite, lo: LoRCSite, config: GearConfig, tokens) -> bool:
    """Whether this decode site runs the fused kernel; the site's reason
    (what `explain` shows) says which path its K takes, and why not the fused one."""
    why = fused_reason(site, lo, config, tokens)
    site.reason += (f"; LoRC K rebuilt inside the attention kernel (gear::{fused_kernel(site, config)[0]}, "
                    "no decompressed store)" if why is None
                    else f"; LoRC K rebuilt by replay (decompress, U^T, RoPE over the past): {why}")
    return why is None


def emit_fused(rw, site: AttentionSite, lo: LoRCSite, length, written: int) -> None:
    """Rewrite the decode site `site` (for `Rewriter.lorc_decode`) as
    `fused_attention`, its output replacing the attention's."""
    from .rewrite import DecodeOut
    out = rw.node(site.output)
    with rw.graph.inserting_before(out):
        attn, k_lat, v_lat = fused_attention(rw, site, lo, length, written)
    out.replace_all_uses_with(attn)
    for append, new in ((site.key, k_lat), (site.value, v_lat)):
        past = rw.node(append.past)
        rw.replaced[rw.node(append.stored)] = (DecodeOut(rw.placeholders.index(past), written),
                                              None if written else new)


def fused_reason(site: AttentionSite, lo: LoRCSite, config: GearConfig, tokens) -> str | None:
    """Why this decode site's attention cannot run as the fused op that
    `fused_kernel` picks (K rebuilt tile by tile inside the kernel), or None
    when it can."""
    if not FUSED:
        return "the fused kernel is switched off (GEAR_LORC_FUSED=0)"
    op, why = fused_kernel(site, config)
    if op is None:
        return why
    if not folds_values(site, tokens):
        return "its attention is not plain (soft cap, sink logits, fp32 upcast or a causal past)"
    if config.rotates("k") or config.rotates("v"):
        return "the codec rotates its stores"
    if lo.key.positions is not None and not isinstance(lo.key.rope, RopeForm):
        return lo.key.rope or "its RoPE form is not recognised"
    if op != "lorc_attention_cpu":
        from ..kernels import lorc_launch
        why = lorc_launch.unsupported(*(example_value(a.past).store.layout for a in (site.key, site.value)),
                                      lo.head_dim)
        return None if why is None else f"the Triton kernel: {why}"
    from ..kernels import cpu
    if not cpu.available():
        return "the C++ kernel is unavailable"
    _register_fake()
    return None


def fused_kernel(site: AttentionSite, config: GearConfig) -> tuple[str | None, str | None]:
    """(the fused op's name, None) for the site's device and `kernel`
    option, or (None, why none): the C++ op on a CPU ("auto", "cpu"), the
    Triton op on CUDA ("auto", "triton"), its interpreted twin on a CPU
    with kernel="triton" under TRITON_INTERPRET=1 (the tests' model path)."""
    device = example_value(site.query).device.type
    if device == "cpu" and config.kernel in ("auto", "cpu"):
        return "lorc_attention_cpu", None
    if config.kernel in ("auto", "triton") and (device == "cuda" or (
            device == "cpu" and config.kernel == "triton" and os.environ.get("TRITON_INTERPRET") == "1")):
        try:
            from ..kernels import lorc_launch  # noqa: F401  (registers the ops)
        except ImportError as err:
            return None, f"the Triton kernel cannot be imported ({err})"
        return ("lorc_attention_triton" if device == "cuda" else "lorc_attention_triton_interpreted"), None
    if device not in ("cpu", "cuda"):
        return None, f"a {device} tensor (the fused kernels are C++ on a CPU and Triton on CUDA)"
    if config.kernel == "triton":
        return None, "kernel='triton' on a CPU tensor without TRITON_INTERPRET=1"
    return None, f"kernel={config.kernel!r}" + (" on a CUDA tensor" if device == "cuda" else "")


def _register_fake():
    if getattr(_register_fake, "done", False):
        return
    torch.library.register_fake("gear::lorc_attention_cpu")(
        lambda q, *args: torch.empty_like(q))
    _register_fake.done = True


def per_head_up(up: torch.Tensor, site: LoRCSite) -> torch.Tensor:
    """[H, r, d] fp32: each KV head's rows of U^T."""
    return up.T.reshape(-1, site.heads, site.head_dim).transpose(0, 1).float().contiguous()


def fused_attention(rw, site: AttentionSite, lo: LoRCSite, length, written: int) -> fx.Node:
    """The site's attention as one fused op (`fused_kernel`'s) over the latent
    stores (kernels: cpu_lorc_attention.h, lorc_decode.py), the new tokens' latents written
    after it. `rw` is the `Rewriter`; returns the output node."""
    graph = rw.graph
    k_parts = rw.inner_placeholders(rw.node(site.key.past))
    v_parts = rw.inner_placeholders(rw.node(site.value.past))
    k_layout, v_layout = (example_value(a.past).store.layout for a in (site.key, site.value))
    q_val = example_value(site.query)
    scale = site.scale if site.scale is not None else q_val.shape[-1] ** -0.5
    form = lo.key.rope if lo.key.positions is not None else None
    cos = sin = None
    if form is not None:
        cos, sin = _past_tables(rw, form, rw.node(lo.key.positions), length)
    k_lat = latent(graph, rw.node(lo.key.pre), rw.constant(lo.key.factors.down))
    v_lat = latent(graph, rw.node(lo.value.pre), rw.constant(lo.value.factors.down))
    op = getattr(torch.ops.gear, fused_kernel(site, rw.config)[0]).default
    attn = graph.call_function(op, (
        rw.node(site.query), k_parts[:-1], v_parts[:-1], k_parts[-1], v_parts[-1],
        rw.node(site.key.new), v_lat, rw.constant(per_head_up(lo.key.factors.up, lo)),
        rw.constant(per_head_up(lo.value.factors.up, lo)), cos, sin, rw.node(site.mask),
        float(scale), bool(site.is_causal), list(k_layout.kernel_descriptor), list(v_layout.kernel_descriptor),
        form.mode if form else 0, form.rotary_dim if form else 0))
    attn.meta["example_value"] = q_val.new_empty(example_value(site.output).shape)
    if written:
        rw.write_latent(lo.key, "k", k_parts, k_lat)
        rw.write_latent(lo.value, "v", v_parts, v_lat)
    return attn, k_lat, v_lat


def _past_tables(rw, form: RopeForm, positions: fx.Node, length):
    """cos and sin [B or 1, 1, length, rotary_dim] at the past's positions
    (per row: the query's position less the past length, plus 0..L-1), the
    graph's own RoPE nodes replayed on them; computed once per graph and
    shared by its layers (their tables are the same nodes)."""
    tables = rw.__dict__.setdefault("_lorc_tables", {})
    if positions not in tables:
        graph = rw.graph
        first = graph.call_function(operator.getitem, (positions, (Ellipsis, slice(0, 1))))
        offsets = graph.call_function(torch.arange, (length,), {"device": example_value(positions).device})
        past = graph.call_function(operator.add, (graph.call_function(operator.sub, (first, length)), offsets))
        tables[positions] = {positions: past}
    env = tables[positions]
    return replay(rw.graph, rw.node(form.cos), env), replay(rw.graph, rw.node(form.sin), env)
