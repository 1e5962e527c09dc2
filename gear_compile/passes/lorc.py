"""LoRC in the graph: find each site's K/V projections, plan the ranks, and
emit the latent writes and the K/V rebuilds (`gear_compile.lorc` has the math).

What a LoRC site looks like (Llama-style attention, Dynamo's torch-level graph):

  k_lin  = linear(x, W_k, b_k)            v_lin = linear(x, W_v, b_v)
  k_pre  = k_lin.view(B, T, H, d).transpose(1, 2)      (v_new likewise)
  k_new  = k_pre * cos + rotate_half(k_pre) * sin      (RoPE; or k_new = k_pre)
  keys   = cat([past_k, k_new], dim=-2)  ->  attention

What the rewrite makes of it (`rewrite` calls `prefill_latent`, `rebuild_past`):

  prefill: the prompt attends its exact K/V, as without LoRC; the cache holds
      the latents [B, 1, T, r] = k_lin U_r (`lorc.project`), compressed by the
      codec of `method` (`gear::kv_prefill`).
  decode: the past is a latent store. K's dequantized latents are rebuilt
      (times U_r^T, back to [B, H, L, d]) and its RoPE is replayed on them: the
      nodes between (k_pre, the positions) and k_new are copied with the
      rebuilt K and the past's positions (the query's position less the
      past length, plus 0..L-1, per row: left padding is kept), so whatever
      rotary form the model uses runs unchanged. The rebuilt past takes the
      past's place in K's cat. V is never rebuilt (`attend_latent_values`):
      softmax(q K^T) (C U^T) = (softmax(q K^T) C) U^T, so attention runs
      over the latents C (past and new, as one head every KV head shares)
      and each query head's output is then multiplied by its rows of U^T.
      Where the attention is not plain (soft cap, sinks, fp32 upcast) V is
      rebuilt like K and the model's attention runs as it is. The new
      tokens' latents are what the graph writes into the buffer.

So the cache holds r numbers per token and layer instead of H * d; each
decode step pays for K's rebuild, L * r * H * d multiply-adds per layer,
plus its RoPE, while V's attention reads r instead of d numbers per key and
query head and its up-projection costs T * Hq * r * d (decode speed in
benchmarks/results/lorc_speed.md).

A site takes LoRC only when each of K and V comes from one linear layer
through that view/transpose chain, K's RoPE (if any) is a function of k_pre
and one integer position tensor, the past is empty at prefill, and the layer
keeps its whole past (no sliding window). Otherwise the site is rewritten
as without LoRC and the report says why LoRC was not applied.

Ranks: over the graph's LoRC sites in order (its layers), from the
projection weights' condition numbers (`lorc.layer_ranks`), in multiples of
`GearConfig.rank_unit`; bases from the weights, or from their calibrated
inputs where `lorc.calibrate` saw them; computed once per set of weights,
calibration and options.
Neighbours: `passes.match` (the sites), `passes.rewrite` (emits the nodes),
`gear_compile.lorc` (bases and ranks), `backend` (hands in the weights).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from .. import lorc
from ..config import GearConfig, codec_of
from .match import AttentionSite, _value
from .pattern import is_call

_LAYOUT_OPS = ("view", "reshape", "transpose", "contiguous", torch.reshape, torch.transpose)
_LINEAR = (torch._C._nn.linear, torch.nn.functional.linear)


@dataclass
class Projection:
    """One of K or V of a LoRC site: its linear layer's weight and bias
    placeholders, the [B, H, T, d] node the latent is taken from (k_pre / v),
    and, for K with RoPE, the position tensor its rotary embedding reads."""

    weight: fx.Node
    bias: fx.Node | None
    pre: fx.Node
    positions: fx.Node | None = None
    rank: int = 0
    basis: torch.Tensor | None = None


@dataclass
class LoRCSite:
    key: Projection
    value: Projection
    heads: int
    head_dim: int


def find(site: AttentionSite) -> LoRCSite | str:
    """The site's LoRC form, or why it has none."""
    if site.key.compressed and (_value(site.key.past).store.logical is None or
                                _value(site.value.past).store.logical is None):
        return "its cache was stored without LoRC"
    if site.key.keep is not None or site.value.keep is not None:
        return "a sliding-window layer"
    if not site.key.compressed and _value(site.key.past).numel() != 0:
        return "a dense past that is not empty (its K is already rotated)"
    k_new, v_new = site.key.new, site.value.new
    rope = _rope(k_new)
    k_pre, positions = rope if rope is not None else (k_new, None)
    if rope is None and not _from_linear(k_new):
        return "K is not a linear layer's output, RoPE'd or not"
    key, value = _projection(k_pre), _projection(v_new)
    if isinstance(key, str) or isinstance(value, str):
        return key if isinstance(key, str) else value
    key.positions = positions
    _, H, T, d = _value(k_pre).shape
    if _value(v_new).shape[1:] != (H, T, d):
        return "V's heads differ from K's"
    return LoRCSite(key, value, H, d)


def _projection(pre: fx.Node) -> Projection | str:
    """pre = linear(x, W, b).view(B, T, H, d).transpose(1, 2) (contiguous /
    reshape allowed): its weight and bias, checked against the shapes."""
    node = _through_layout(pre)
    if not is_call(node, *_LINEAR):
        return "K or V is not a linear layer's output (a fused or custom projection)"
    weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if not isinstance(weight, fx.Node) or weight.op != "placeholder" or \
            not (bias is None or (isinstance(bias, fx.Node) and bias.op == "placeholder")):
        return "the K/V projection's weight is not a model parameter"
    B, H, T, d = _value(pre).shape
    lin = _value(node)
    if tuple(lin.shape) != (B, T, H * d):
        return f"the projection's output {tuple(lin.shape)} is not the heads of K/V [B, T, {H} * {d}]"
    return Projection(weight, bias, pre)


def _through_layout(node):
    """The node under view / reshape / transpose / contiguous calls."""
    while is_call(node, *_LAYOUT_OPS):
        node = node.args[0]
    return node


def _from_linear(node) -> bool:
    return is_call(_through_layout(node), *_LINEAR)


def _rope(k_new):
    """k_new = k_pre * cos + rot(k_pre) * sin: (k_pre, the position tensor)."""
    if not is_call(k_new, operator.add, torch.add) or len(k_new.args) != 2:
        return None
    products = [a for a in k_new.args if is_call(a, operator.mul, torch.mul)]
    if len(products) != 2:
        return None
    for first, second in (products, products[::-1]):
        for k_pre in first.args:
            if isinstance(k_pre, fx.Node) and _from_linear(k_pre) and _ancestor(k_pre, second):
                cos = first.args[1] if first.args[0] is k_pre else first.args[0]
                positions = _positions(cos, _value(k_new).shape[2])
                return (k_pre, positions) if positions is not None else None
    return None


def _ancestor(a: fx.Node, b: fx.Node, depth: int = 12) -> bool:
    frontier = [b]
    for _ in range(depth):
        frontier = [x for n in frontier for x in n.all_input_nodes]
        if a in frontier:
            return True
    return False


def _positions(cos: fx.Node, tokens):
    """The integer tensor of the new tokens' positions that `cos` is computed
    from: the nearest integer ancestor whose last dim is the token count."""
    seen, frontier = set(), [cos]
    while frontier:
        node = frontier.pop(0)
        if node in seen or not isinstance(node, fx.Node):
            continue
        seen.add(node)
        v = _value(node)
        if isinstance(v, torch.Tensor) and not v.is_floating_point() and v.dtype != torch.bool \
                and 1 <= v.dim() <= 2 and v.shape[-1] == tokens:
            return node
        frontier += node.all_input_nodes
    return None


# ---------------------------------------------------------------- planning
_RANKS: dict = {}       # (weights, options) -> the schedule's (K ranks, V ranks)
_BASES: dict = {}       # (weight, bias, rank, calibration) -> U_r


def plan(sites: list[tuple[AttentionSite, LoRCSite]], weights: dict, config: GearConfig) -> None:
    """Set each LoRC site's ranks and bases (real `weights` by placeholder).

    A prefill site takes the schedule's ranks over this graph's layers; a
    decode site takes the rank its store already holds, so the two agree
    however Dynamo splits the model into graphs (the basis depends on the
    weights and the rank alone)."""
    pairs = [(weights[s.key.weight], _maybe(weights, s.key.bias), weights[s.value.weight],
              _maybe(weights, s.value.bias)) for _, s in sites]
    key = (tuple(t.data_ptr() if t is not None else 0 for p in pairs for t in p),
           config.lorc, config.lorc_schedule, config.rank_unit)
    if key not in _RANKS:
        full = sites[0][1].heads * sites[0][1].head_dim
        _RANKS[key] = [lorc.layer_ranks([lorc.condition_number(p[i]) for p in pairs], 1.0 - config.lorc,
                                        full, config.lorc_schedule, config.rank_unit) for i in (0, 2)]
    for (site, s), (wk, bk, wv, bv), rk, rv in zip(sites, pairs, *_RANKS[key]):
        if site.key.compressed:
            rk = _value(site.key.past).store.buffer.shape[-1]
            rv = _value(site.value.past).store.buffer.shape[-1]
        s.key.rank, s.key.basis = rk, _basis(wk, bk, rk)
        s.value.rank, s.value.basis = rv, _basis(wv, bv, rv)


def _basis(weight: torch.Tensor, bias: torch.Tensor | None, rank: int) -> torch.Tensor:
    moment = lorc.MOMENTS.get(weight)
    key = (weight.data_ptr(), bias.data_ptr() if bias is not None else 0, rank, id(moment))
    if key not in _BASES:
        with torch.no_grad():
            _BASES[key] = lorc.projection_basis(weight, bias, rank, moment=moment)
    return _BASES[key]


def _maybe(weights, node):
    return weights[node] if node is not None else None


# ---------------------------------------------------------------- emitting
def latent(graph: fx.Graph, pre: fx.Node, basis: fx.Node) -> fx.Node:
    """[B, H, T, d] -> the latent [B, 1, T, r]: heads back to the projection's
    [B, T, H * d], times U_r."""
    lin = graph.call_method("flatten", (graph.call_method("transpose", (pre, 1, 2)), 2))
    return graph.call_method("unsqueeze", (graph.call_function(torch.matmul, (lin, basis)), 1))


def rebuild_past(graph: fx.Graph, site: LoRCSite, parts: list, config: GearConfig, kind: str,
                 length, basis: fx.Node, new: fx.Node, pre: fx.Node, positions: fx.Node | None) -> fx.Node:
    """The past's K or V [B, H, length, d] from the latent store's inner
    tensors `parts`; with `positions` (K under RoPE), the nodes from (pre,
    positions) to `new` replayed on it at the past's positions."""
    latents = _past_latents(graph, parts, config, kind, length, _value(pre).dtype)
    lin = graph.call_function(torch.matmul, (graph.call_method("squeeze", (latents, 1)),
                                             graph.call_method("t", (basis,))))
    rebuilt = graph.call_method("transpose", (graph.call_method(
        "unflatten", (lin, -1, (site.heads, site.head_dim))), 1, 2))
    if positions is None:
        return rebuilt
    first = graph.call_function(operator.getitem, (positions, (Ellipsis, slice(0, 1))))
    offsets = graph.call_function(torch.arange, (length,), {"device": _value(positions).device})
    past = graph.call_function(operator.add, (graph.call_function(operator.sub, (first, length)), offsets))
    return replay(graph, new, {pre: rebuilt, positions: past})


def _past_latents(graph: fx.Graph, parts: list, config: GearConfig, kind: str, length,
                  dtype: torch.dtype) -> fx.Node:
    """The latent store's `length` tokens, dequantized: [B, 1, length, r] of `dtype`."""
    return graph.call_function(torch.ops.gear.dequantize.default,
                               (parts, codec_of(config).to_json(), kind, length, dtype))


def folds_values(site: AttentionSite, tokens) -> bool:
    """V's up-projection can move past the attention (`attend_latent_values`)
    when the attention is plain scaled-dot-product: no soft cap, no sinks,
    no top-left causal flag over a past."""
    q, out = _value(site.query), _value(site.output)
    return site.softcap is None and site.sinks is None and q.dtype == out.dtype and \
        (tokens == 1 or not site.is_causal)


def up_projection(basis: torch.Tensor, site: LoRCSite, query_heads: int) -> torch.Tensor:
    """[Hq, r, d]: for each query head, the rows of U_r^T of its KV head."""
    per_kv = basis.T.reshape(-1, site.heads, site.head_dim).transpose(0, 1)     # [H, r, d]
    return per_kv.repeat_interleave(query_heads // site.heads, dim=0).contiguous()


def attend_latent_values(graph: fx.Graph, site: AttentionSite, lo: LoRCSite, q: fx.Node, keys: fx.Node,
                         mask: fx.Node | None, parts: list, new: fx.Node, config: GearConfig, length,
                         up: fx.Node) -> fx.Node:
    """softmax(q K^T) (C U^T) = (softmax(q K^T) C) U^T: attention over the
    latents C (the past's, dequantized, then the new tokens'), one head
    shared by every KV head, then each query head's rows of U^T. V itself is
    never rebuilt. Returns the [B, Hq, T, d] output."""
    past = _past_latents(graph, parts, config, "v", length, _value(site.query).dtype)
    latents = graph.call_function(torch.cat, ([past, new],),
                                  {"dim": 2})
    values = graph.call_method("expand", (latents, -1, lo.heads, -1, -1))
    out = graph.call_function(torch.nn.functional.scaled_dot_product_attention, (q, keys, values), {
        "attn_mask": mask, "scale": site.scale, "is_causal": bool(site.is_causal), "enable_gqa": True})
    return graph.call_function(torch.matmul, (out, up))


def replay(graph: fx.Graph, target: fx.Node, substitutes: dict) -> fx.Node:
    """A copy of the nodes that lead from `substitutes`' keys to `target`,
    reading the substitutes instead; returns the copy of `target`."""
    needed = _ancestors(target) | {target}
    env = dict(substitutes)
    for node in list(graph.nodes):
        if node in needed and node not in env and any(i in env for i in node.all_input_nodes):
            env[node] = graph.node_copy(node, lambda n: env.get(n, n))
        if node is target:
            break
    return env[target]


def _ancestors(node: fx.Node) -> set:
    seen, stack = set(), [node]
    while stack:
        for i in stack.pop().all_input_nodes:
            if i not in seen:
                seen.add(i)
                stack.append(i)
    return seen
