"""LoRC in the graph: find each site's K/V projections, plan the ranks, and
emit the latent writes and the K/V rebuilds (`gear_compile.lorc` has the math).

What a LoRC site looks like (Llama-style attention, Dynamo's torch-level graph):

  k_lin  = linear(x, W_k, b_k)            v_lin = linear(x, W_v, b_v)
  k_pre  = k_lin.view(B, T, H, d).transpose(1, 2)      (v_new likewise)
  k_new  = k_pre * cos + rotate_half(k_pre) * sin      (RoPE; or k_new = k_pre)
  keys   = cat([past_k, k_new], dim=-2)  ->  attention

What the rewrite makes of it (`rewrite` calls `latent`, `sinks`, `rebuild_past`,
`attend_latent_values`):

  prefill: the prompt attends its exact K/V, as without LoRC; the cache holds
      the latents [B, 1, T, r] = k_lin D (`lorc.project`), compressed by the
      codec of `method` (`gear::kv_prefill`), and the first `lorc_sinks`
      tokens' k_pre / v exactly (the store's `lorc_sinks`).
  decode: the past is a latent store. K's decompressed latents are rebuilt
      (times U^T, back to [B, H, L, d]), its sink rows are replaced by the
      exact ones, and its RoPE is replayed on them: the nodes between (k_pre,
      the positions) and k_new are copied with the rebuilt K and the past's
      positions (the query's position less the past length, plus 0..L-1,
      per row: left padding is kept), so whatever rotary form the model uses
      runs unchanged. The rebuilt past takes the past's place in K's cat. V
      is never rebuilt (`attend_latent_values`): softmax(q K^T) (C U^T) =
      (softmax(q K^T) C) U^T, so attention runs over the latents C (past and
      new, as one head every KV head shares) and each query head's output is
      then multiplied by its rows of U^T. The sinks ride along as s more
      value columns, column j one at token j and zero elsewhere, so the
      attention also returns each sink's probability p_j, and p_j times the
      sink's residual (its exact V less the V its latent rebuilds) is added.
      Where the attention is not plain (soft cap, the model's sink logits,
      fp32 upcast) V is rebuilt like K and the model's attention runs as it
      is. The new tokens' latents are what the graph writes into the buffer.

  decode, fused (the default): the attention is one fused op over the
      latent stores, K rebuilt tile by tile inside the kernel; when and how:
      `passes.lorc_fused`.

So the cache holds r numbers per token and layer instead of H * d (plus
the s exact sinks); each decode step pays for K's rebuild, L * r * H * d
multiply-adds per layer, plus its RoPE, while V's attention reads r + s
instead of d numbers per key and query head and its up-projection costs
T * Hq * r * d (decode speed: benchmarks/results/lorc_generate_throughput_cpu.md).

A site takes LoRC only when each of K and V comes from one linear layer
through that view/transpose chain, K's RoPE (if any) is a function of k_pre
and one integer position tensor, the past is empty at prefill, and the layer
keeps its whole past (no sliding window). Otherwise the site is rewritten
as without LoRC and the report says why LoRC was not applied.

Ranks and factors: `lorc.plan` over the graph's LoRC sites in order (its
layers), in multiples of `GearConfig.rank_unit`, with what `lorc.calibrate`
recorded for those weights; computed once per set of weights, calibration
and options.
Neighbours: `passes.match` (the sites), `passes.lorc_fused` (the fused
kernel's path), `passes.rewrite` (emits the nodes),
`gear_compile.lorc` (factors and ranks), `backend` (hands in the weights).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.utils.weak import WeakIdKeyDictionary

from .. import lorc
from ..config import GearConfig, codec_of
from .match import AttentionSite
from .pattern import example_value
from .pattern import is_call

_LAYOUT_OPS = ("view", "reshape", "transpose", "contiguous", torch.reshape, torch.transpose)
_LINEAR = (torch._C._nn.linear, torch.nn.functional.linear)


@dataclass
class RopeForm:
    """K's RoPE as the fused kernel applies it: k = k_pre * cos + rot(k_pre) * sin
    over the first `rotary_dim` channels (the rest pass through); `mode` 1 is
    rotate-half (rot = [-x2, x1]), 2 interleaved (rot pairs (-x_2i+1, x_2i));
    `cos` / `sin` the graph's [B, 1, T, rotary_dim] tables of the new tokens,
    which the decode graph recomputes at the past's positions."""

    mode: int
    rotary_dim: int
    cos: fx.Node
    sin: fx.Node


@dataclass
class Projection:
    """One of K or V of a LoRC site: its linear layer's weight and bias
    placeholders, the [B, H, T, d] node the latent is taken from (k_pre / v),
    for K with RoPE the position tensor its rotary embedding reads, and the
    factors `plan` chose."""

    weight: fx.Node
    bias: fx.Node | None
    pre: fx.Node
    positions: fx.Node | None = None
    factors: lorc.Factors | None = None
    rope: RopeForm | str | None = None      # K's rotary form for the fused kernel, or why it has none

    @property
    def rank(self) -> int:
        return self.factors.rank


@dataclass
class LoRCSite:
    key: Projection
    value: Projection
    heads: int
    head_dim: int


def find(site: AttentionSite) -> LoRCSite | str:
    """The site's LoRC form, or why it has none."""
    if site.key.compressed and (example_value(site.key.past).store.logical is None or
                                example_value(site.value.past).store.logical is None):
        return "its cache was stored without LoRC"
    if site.key.keep is not None or site.value.keep is not None:
        return "a sliding-window layer"
    if not site.key.compressed and example_value(site.key.past).numel() != 0:
        return "a dense past that is not empty (its K is already rotated)"
    k_new, v_new = site.key.new, site.value.new
    rope = _rope(k_new)
    k_pre, positions, form = rope if rope is not None else (k_new, None, None)
    if rope is None and not _from_linear(k_new):
        return "K is not a linear layer's output, RoPE'd or not"
    key, value = _projection(k_pre), _projection(v_new)
    if isinstance(key, str) or isinstance(value, str):
        return key if isinstance(key, str) else value
    key.positions, key.rope = positions, form
    _, H, T, d = example_value(k_pre).shape
    if example_value(v_new).shape[1:] != (H, T, d):
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
    B, H, T, d = example_value(pre).shape
    lin = example_value(node)
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
    """k_new = k_pre * cos + rot(k_pre) * sin, or with partial rotary
    cat([k_pre[..., :rd] * cos + rot(k_pre[..., :rd]) * sin, k_pre[..., rd:]], -1):
    (k_pre, the position tensor, its `RopeForm` or why the fused kernel
    cannot apply it)."""
    full, rd, rotated = None, None, k_new
    if is_call(k_new, torch.cat) and isinstance(k_new.args[0], (list, tuple)) and len(k_new.args[0]) == 2 \
            and (k_new.args[1] if len(k_new.args) > 1 else k_new.kwargs.get("dim", 0)) in (-1, 3):
        rotated, passed = k_new.args[0]
        cut = _sliced(passed)
        if cut is None or cut[2] is not None or not _from_linear(cut[0]):
            return None
        full, rd = cut[0], cut[1]
    if not is_call(rotated, operator.add, torch.add) or len(rotated.args) != 2:
        return None
    products = [a for a in rotated.args if is_call(a, operator.mul, torch.mul)]
    if len(products) != 2:
        return None
    for first, second in (products, products[::-1]):
        for x in first.args:
            if not isinstance(x, fx.Node):
                continue
            if full is None:
                found, k_pre = _from_linear(x), x
            else:
                found, k_pre = _sliced(x) == (full, None, rd), full
            if found and _ancestor(x, second):
                cos = first.args[1] if first.args[0] is x else first.args[0]
                positions = _positions(cos, example_value(k_new).shape[2])
                if positions is None:
                    return None
                return k_pre, positions, _form(x, second, cos, int(example_value(x).shape[-1]))
    return None


def _sliced(node):
    """node = base[..., a:b] (a or b None): (base, a, b), else None."""
    if not is_call(node, operator.getitem):
        return None
    base, index = node.args
    if not isinstance(index, tuple) or len(index) != 2 or index[0] is not Ellipsis or \
            not isinstance(index[1], slice) or index[1].step not in (None, 1):
        return None
    return base, index[1].start, index[1].stop


def _form(x: fx.Node, second: fx.Node, cos, width: int) -> RopeForm | str:
    """Which rotation `second` = rot(x) * sin applies, found by running the
    nodes from x to rot(x) on a probe; RopeForm or why the kernel cannot."""
    rot = next((a for a in second.args if isinstance(a, fx.Node) and (a is x or _ancestor(x, a))), None)
    sin = second.args[1] if second.args[0] is rot else second.args[0]
    if rot is None or not isinstance(sin, fx.Node) or not isinstance(cos, fx.Node):
        return "its RoPE's cos / sin are not graph values"
    T = example_value(x).shape[2]
    for table in (cos, sin):
        shape = tuple(example_value(table).shape)
        if len(shape) != 4 or shape[1] != 1 or shape[3] != width or (shape[2] != T and shape[2] != 1):
            return f"its RoPE tables {shape} are not [B, 1, T, {width}] (per head or per channel pair)"
    if width % 2:
        return "an odd rotary width"
    shape = [int(d) if isinstance(d, int) else int(d.node.hint) for d in example_value(x).shape]
    probe = torch.arange(1, width + 1, dtype=torch.float32).expand(shape).to(example_value(x).dtype)
    try:
        out = _run_chain(x, rot, probe)
    except Exception as err:              # a chain the probe cannot run: keep the replay
        return f"its rotation could not be probed ({type(err).__name__})"
    if out is None or tuple(out.shape) != tuple(shape):
        return "its rotation reads more than K"
    out = out.float().reshape(-1, width)[0]
    h = width // 2
    idx = torch.arange(1, width + 1, dtype=torch.float32)
    half = torch.cat([-idx[h:], idx[:h]])
    pairs = torch.stack([-idx[1::2], idx[0::2]], -1).flatten()
    if torch.equal(out, half):
        return RopeForm(1, width, cos, sin)
    if torch.equal(out, pairs):
        return RopeForm(2, width, cos, sin)
    return "its rotation is neither rotate-half nor interleaved"


def _run_chain(source: fx.Node, target: fx.Node, x: torch.Tensor):
    """The nodes from `source` to `target` run on x (None if they read
    anything but source and constants)."""
    g = fx.Graph()
    env = {source: g.placeholder("x")}
    needed = _ancestors(target) | {target}
    for node in source.graph.nodes:
        if node in env or node not in needed or not any(i in env for i in node.all_input_nodes):
            continue
        if any(i not in env for i in node.all_input_nodes) or node.op not in ("call_function", "call_method"):
            return None
        env[node] = g.node_copy(node, lambda n: env[n])
    if target not in env:
        return None
    g.output(env[target])
    with torch.no_grad():
        return fx.GraphModule(torch.nn.Module(), g)(x)


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
        v = example_value(node)
        if isinstance(v, torch.Tensor) and not v.is_floating_point() and v.dtype != torch.bool \
                and 1 <= v.dim() <= 2 and v.shape[-1] == tokens:
            return node
        frontier += node.all_input_nodes
    return None


# ---------------------------------------------------------------- planning
# Cached by the weight tensors themselves (weakly: a freed model's entries go
# with it, and a new model's tensors at the same addresses never see them),
# then by their versions (an in-place update replans), calibration and options.
_PLANS: WeakIdKeyDictionary = WeakIdKeyDictionary()       # first K weight -> {key: lorc.Plan}
_FACTORS: WeakIdKeyDictionary = WeakIdKeyDictionary()     # weight -> {key: lorc.Factors}


def plan(sites: list[tuple[AttentionSite, LoRCSite]], weights: dict, config: GearConfig) -> str:
    """Set each LoRC site's factors (real `weights` by placeholder); returns
    the schedule that ran.

    A prefill site takes `lorc.plan`'s ranks over this graph's layers; a
    decode site takes the rank its store already holds, so the two agree
    however Dynamo splits the model into graphs (the factors depend on the
    weights, the calibration and the rank alone)."""
    projections = [((weights[s.key.weight], _maybe(weights, s.key.bias)),
                    (weights[s.value.weight], _maybe(weights, s.value.bias))) for _, s in sites]
    tensors = [t for layer in projections for pair in layer for t in pair if t is not None]
    key = (_identity(tensors), config.lorc, config.lorc_schedule, config.rank_unit, config.lorc_basis)
    plans = _PLANS.setdefault(tensors[0], {})
    if key not in plans:
        weights_only = config.lorc_basis == "weights"
        if not weights_only:
            lorc.require_calibration([w for layer in projections for w, _ in layer])
        plans[key] = lorc.plan(projections, 1.0 - config.lorc, config.lorc_schedule, config.rank_unit,
                               basis="weights" if weights_only else "loss")
    chosen = plans[key]
    for (site, s), layer, pair in zip(sites, projections, chosen.factors):
        if not site.key.compressed:
            s.key.factors, s.value.factors = pair
            continue
        for proj, (w, b), past in ((s.key, layer[0], site.key.past), (s.value, layer[1], site.value.past)):
            rank = int(example_value(past).store.buffer.shape[-1])   # a SymInt where another model's ranks differ
            proj.factors = _factors(w, b, rank, chosen.loss_aware, config.lorc_basis == "weights")
    return chosen.schedule


def _identity(tensors) -> tuple:
    """Which tensors, which versions of them, and which calibration of each."""
    return tuple((id(t), t._version, id(lorc.MOMENTS.get(t)), id(lorc.FISHER.get(t))) for t in tensors)


def _factors(weight: torch.Tensor, bias: torch.Tensor | None, rank: int, loss_aware: bool,
             weights_only: bool) -> lorc.Factors:
    moment = None if weights_only else lorc.MOMENTS.get(weight)
    fisher = lorc.FISHER.get(weight) if loss_aware else None
    key = (_identity([t for t in (weight, bias) if t is not None]), rank, loss_aware, weights_only)
    cached = _FACTORS.setdefault(weight, {})
    if key not in cached:
        with torch.no_grad():
            cached[key] = lorc.factors(weight, bias, rank, moment=moment, fisher=fisher)
    return cached[key]


def _maybe(weights, node):
    return weights[node] if node is not None else None


# ---------------------------------------------------------------- emitting
def latent(graph: fx.Graph, pre: fx.Node, down: fx.Node) -> fx.Node:
    """[B, H, T, d] -> the latent [B, 1, T, r]: heads back to the projection's
    [B, T, H * d], times D."""
    lin = graph.call_method("flatten", (graph.call_method("transpose", (pre, 1, 2)), 2))
    return graph.call_method("unsqueeze", (graph.call_function(torch.matmul, (lin, down)), 1))


def sinks(graph: fx.Graph, pre: fx.Node, config: GearConfig) -> fx.Node:
    """The first `lorc_sinks` tokens of [B, H, T, d] (all of them when fewer), a copy."""
    first = graph.call_function(operator.getitem, (pre, (slice(None), slice(None), slice(0, config.lorc_sinks))))
    return graph.call_method("clone", (first,))


def rebuild_past(graph: fx.Graph, site: LoRCSite, parts: list, config: GearConfig, kind: str,
                 length, up: fx.Node, new: fx.Node, pre: fx.Node, positions: fx.Node | None) -> fx.Node:
    """The past's K or V [B, H, length, d] from the latent store's inner
    tensors `parts` (its sinks last: they replace the rebuilt first rows);
    with `positions` (K under RoPE), the nodes from (pre, positions) to
    `new` replayed on it at the past's positions."""
    *store, exact = parts
    latents = _past_latents(graph, store, config, kind, length, example_value(pre).dtype)
    rebuilt = _heads(graph, site, graph.call_function(torch.matmul, (graph.call_method("squeeze", (latents, 1)),
                                                                     graph.call_method("t", (up,)))))
    s = _sink_count(graph, exact)
    if s:
        rest = graph.call_function(operator.getitem, (rebuilt, (slice(None), slice(None), slice(s, None))))
        rebuilt = graph.call_function(torch.cat, ([exact, rest],), {"dim": 2})
    if positions is None:
        return rebuilt
    first = graph.call_function(operator.getitem, (positions, (Ellipsis, slice(0, 1))))
    offsets = graph.call_function(torch.arange, (length,), {"device": example_value(positions).device})
    past = graph.call_function(operator.add, (graph.call_function(operator.sub, (first, length)), offsets))
    return replay(graph, new, {pre: rebuilt, positions: past})


def _sink_count(graph: fx.Graph, exact: fx.Node):
    """How many sinks a store holds: 0, an int, or (when Dynamo made the
    count dynamic: prompts shorter than lorc_sinks) a node of the graph."""
    s = example_value(exact).shape[2]
    return s if isinstance(s, int) else graph.call_method("size", (exact, 2))


def _heads(graph: fx.Graph, site: LoRCSite, lin: fx.Node) -> fx.Node:
    """[B, L, H * d] -> [B, H, L, d]."""
    return graph.call_method("transpose", (graph.call_method("unflatten", (lin, -1, (site.heads, site.head_dim))),
                                           1, 2))


def _past_latents(graph: fx.Graph, parts: list, config: GearConfig, kind: str, length,
                  dtype: torch.dtype) -> fx.Node:
    """The latent store's `length` tokens, decompressed: [B, 1, length, r] of `dtype`."""
    return graph.call_function(torch.ops.gear.decompress.default,
                               (parts, codec_of(config).to_json(), kind, length, dtype))


def folds_values(site: AttentionSite, tokens) -> bool:
    """V's up-projection can move past the attention (`attend_latent_values`)
    when the attention is plain scaled-dot-product: no soft cap, no sink logits,
    no top-left causal flag over a past."""
    q, out = example_value(site.query), example_value(site.output)
    return site.softcap is None and site.sink_logits is None and q.dtype == out.dtype and \
        (tokens == 1 or not site.is_causal)


def up_projection(up: torch.Tensor, site: LoRCSite, query_heads: int) -> torch.Tensor:
    """[Hq, r, d]: for each query head, the rows of U^T of its KV head."""
    per_kv = up.T.reshape(-1, site.heads, site.head_dim).transpose(0, 1)     # [H, r, d]
    return per_kv.repeat_interleave(query_heads // site.heads, dim=0).contiguous()


def attend_latent_values(graph: fx.Graph, site: AttentionSite, lo: LoRCSite, q: fx.Node, keys: fx.Node,
                         mask: fx.Node | None, parts: list, new: fx.Node, config: GearConfig, length,
                         up: fx.Node, up_heads: fx.Node) -> fx.Node:
    """softmax(q K^T) (C U^T) = (softmax(q K^T) C) U^T: attention over the
    latents C (the past's, decompressed, then the new tokens'), one head
    shared by every KV head, then each query head's rows of U^T (`up_heads`).
    V itself is never rebuilt. The store's sinks (last of `parts`) enter as
    one-hot value columns whose outputs are their probabilities (module
    docstring). Returns the [B, Hq, T, d] output."""
    *store, exact = parts
    dtype, s = example_value(site.query).dtype, _sink_count(graph, exact)
    past = _past_latents(graph, store, config, "v", length, dtype)
    latents = graph.call_function(torch.cat, ([past, new],), {"dim": 2})
    if s:
        tokens = graph.call_method("size", (latents, 2))
        device = example_value(site.query).device
        marks = graph.call_function(operator.eq, (
            graph.call_method("unsqueeze", (graph.call_function(torch.arange, (tokens,), {"device": device}), 1)),
            graph.call_function(torch.arange, (s,), {"device": device})))
        marks = graph.call_method("expand", (graph.call_method("to", (marks, dtype)),
                                             graph.call_method("size", (latents, 0)), 1, -1, -1))
        latents = graph.call_function(torch.cat, ([latents, marks],), {"dim": -1})
    values = graph.call_method("expand", (latents, -1, lo.heads, -1, -1))
    out = graph.call_function(torch.nn.functional.scaled_dot_product_attention, (q, keys, values), {
        "attn_mask": mask, "scale": site.scale, "is_causal": bool(site.is_causal), "enable_gqa": True})
    if not s:
        return graph.call_function(torch.matmul, (out, up_heads))
    r = lo.value.rank
    mixed = graph.call_function(operator.getitem, (out, (Ellipsis, slice(0, r))))
    probs = graph.call_function(operator.getitem, (out, (Ellipsis, slice(r, None))))
    first = graph.call_function(operator.getitem, (past, (slice(None), 0, slice(0, s))))
    rebuilt = _heads(graph, lo, graph.call_function(torch.matmul, (first, graph.call_method("t", (up,)))))
    residual = graph.call_method("repeat_interleave", (graph.call_function(operator.sub, (exact, rebuilt)),
                                                       example_value(site.query).shape[1] // lo.heads), {"dim": 1})
    return graph.call_function(operator.add, (graph.call_function(torch.matmul, (mixed, up_heads)),
                                              graph.call_function(torch.matmul, (probs, residual))))


def replay(graph: fx.Graph, target: fx.Node, substitutes: dict) -> fx.Node:
    """A copy of the nodes that lead from `substitutes`' keys to `target`,
    reading the substitutes instead; returns the copy of `target`. A dict
    `substitutes` gains the copies, so a later replay from it reuses them."""
    if target in substitutes:
        return substitutes[target]
    needed = _ancestors(target) | {target}
    env = substitutes
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
