"""Find attention sites and the KV-appends feeding them in a Dynamo FX graph.

The graph is Dynamo's torch-level graph (torch functions and tensor methods).
Each recognised form is a small function named for the code it matches:

  kv append      torch.cat([past, new], dim=-2)              (DynamicCache)
                 cat(...)[:, :, -(W - 1):]  kept, cat attended   (sliding window W)
                 past.index_copy_(2, pos, new) / index_put_   (StaticCache: reported)
  K/V feeding    kv, or repeat_kv(kv) = kv[:, :, None].expand(...).reshape(...),
                 maybe upcast to fp32 (.float())
  attention      F.scaled_dot_product_attention(q, K, V, ...)             (sdpa)
                 matmul(softmax(matmul(q, K.transpose) * s [+ mask]), V)   (eager)
                 bmm(softmax(bmm(q3, K3.transpose) [+ mask]), V3), heads
                     flattened into the batch                            (bmm)
                 ... with scores soft-capped: c * tanh(scores / c)    (Gemma 2)
                 ... with scores less their row max (a softmax ignores the shift)
                 ... with attention sinks: a softmax column    (gpt-oss)
                     or the output times sigmoid(lse - sink)   (Granite SWA)

`find_sites` returns every attention site found, rewritable or not, each with
the reason; `rewrite` acts only on rewritable ones and everything else stays
exact. A softmax or a KV-append that no recognised form covers is returned
too, as an `unknown` site with what makes it different (scores through
einsum, ALiBi through baddbmm, ...), so an attention the matcher cannot read
is reported, never silently skipped (a softmax counts as an attention's when
its scores are a product of two tensors: a MoE router's, over a linear
layer's output, does not). Neighbours: `passes.rewrite` (consumes `AttentionSite`), `explain`
(prints them).
"""
from __future__ import annotations

import inspect
import operator
import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..compressed_kv import CompressedKV

_ROOT = re.compile(r"^L\['self'\]|^L\['args'\]\[0\]")   # Dynamo's name for the compiled model

SDPA_SIGNATURE = inspect.signature(
    lambda query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
    enable_gqa=False: None)


@dataclass
class KVAppend:
    """past ++ new along the sequence dim. The cache keeps `stored`: the
    append itself, or (a sliding-window layer) its last `keep` tokens."""

    node: fx.Node
    past: fx.Node
    new: fx.Node
    stored: fx.Node | None = None
    keep: int | None = None

    @property
    def compressed(self) -> bool:
        return isinstance(_value(self.past), CompressedKV)


@dataclass
class AttentionSite:
    index: int
    form: str                       # "sdpa", "eager", "bmm", or "unknown" (reported, never rewritten)
    output: fx.Node                 # node holding the attention output [B, Hq, T, D]
    query: fx.Node
    key: KVAppend | None
    value: KVAppend | None
    mask: fx.Node | None = None
    scale: float | None = None
    is_causal: bool = False
    softcap: float | None = None    # scores -> softcap * tanh(scores / softcap), before the mask
    sinks: fx.Node | None = None    # per query head sink logits [Hq]: an extra softmax column, no value
    reason: str = ""
    rewritable: bool = False
    chain: list = field(default_factory=list)   # nodes between K/V and the output

    @property
    def layer(self) -> str:
        stack = self.output.meta.get("nn_module_stack") or {}
        if stack:
            return module_path(list(stack.values())[-1][0])
        return f"site {self.index}"

    @property
    def head_dim(self) -> int:
        return _value(self.key.new).shape[-1]

    @property
    def phase(self) -> str:
        if self.key is None:
            return "-"
        return "decode" if self.key.compressed else "prefill"


def module_path(source: str) -> str:
    """A module's path as the model names it, without Dynamo's name for the
    model: "L['args'][0].model.layers.0.self_attn" -> "model.layers.0.self_attn",
    "L['self']" -> "model"."""
    return _ROOT.sub("", source).lstrip(".") or "model"


def _value(node):
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None


def _is_call(node, *targets) -> bool:
    """node calls one of `targets` (functions, or method names as strings)."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        return node.target in targets
    if node.op == "call_method":
        return node.target in targets
    return False


# ---- K/V forms ------------------------------------------------------------
def kv_append(node) -> KVAppend | None:
    """torch.cat([past, new], dim=-2 or 2)."""
    if not _is_call(node, torch.cat):
        return None
    tensors = node.args[0]
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    if not isinstance(tensors, (list, tuple)) or len(tensors) != 2 or dim not in (-2, 2):
        return None
    return KVAppend(node, tensors[0], tensors[1], stored=node)


def window_slice(node) -> int | None:
    """`kv[:, :, -keep:]` (a sliding-window layer keeping its last `keep`
    tokens, as DynamicSlidingWindowLayer does): keep, else None."""
    if not _is_call(node, operator.getitem) or not isinstance(node.args[1], tuple):
        return None
    index = node.args[1]
    if index and index[0] is Ellipsis:
        index = (slice(None),) * (4 - len(index) + 1) + index[1:]
    index = index + (slice(None),) * (4 - len(index))
    if len(index) != 4 or not all(isinstance(i, slice) for i in index):
        return None
    whole = slice(None)
    seq = index[2]
    if index[:2] != (whole, whole) or index[3] != whole or seq.stop is not None or seq.step not in (None, 1):
        return None
    return -seq.start if isinstance(seq.start, int) and seq.start < 0 else None


def through_repeat_kv(node, chain: list):
    """repeat_kv(kv) = kv[:, :, None, :, :].expand(...).reshape(...) -> kv; also
    strips .contiguous() and upcasts to fp32 (`.float()`, attention computed
    in fp32: every kernel computes in fp32 from the stored values, so the
    upcast changes nothing). Nodes passed are appended to `chain`."""
    while _is_call(node, "contiguous") or _upcast(node):
        chain.append(node)
        node = node.args[0]
    if _is_call(node, "reshape", torch.reshape):
        expand = node.args[0]
        if _is_call(expand, "expand"):
            index = expand.args[0]
            if _is_call(index, operator.getitem) and isinstance(index.args[1], tuple) \
                    and None in index.args[1]:
                chain += [node, expand, index]
                return index.args[0]
    return node


def _upcast(node) -> bool:
    """`x.float()` or `x.to(torch.float32)`."""
    if _is_call(node, "float"):
        return len(node.args) == 1 and not node.kwargs
    if _is_call(node, "to"):
        dtype = node.kwargs.get("dtype", node.args[1] if len(node.args) == 2 else None)
        return dtype is torch.float32 and len(node.args) <= 2 and set(node.kwargs) <= {"dtype"}
    return False


def _static_cache_write(node):
    """`past.index_copy_(2, pos, new)` or index_put_: a StaticCache write."""
    return _is_call(node, "index_copy_", "index_put_", torch.Tensor.index_copy_,
                    torch.ops.aten.index_copy_.default)


# ---- attention forms ------------------------------------------------------
def sdpa_site(node, index):
    """F.scaled_dot_product_attention(q, K, V, attn_mask, dropout_p, is_causal, scale, enable_gqa)."""
    if not _is_call(node, F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention):
        return None
    bound = SDPA_SIGNATURE.bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    a = bound.arguments
    site = AttentionSite(index, "sdpa", node, a["query"], None, None, mask=a["attn_mask"],
                         scale=a["scale"], is_causal=bool(a["is_causal"]))
    if a["dropout_p"] not in (0, 0.0):
        site.reason = f"dropout_p={a['dropout_p']} (training-time attention is left exact)"
        return site
    _attach_kv(site, a["key"], a["value"])
    return site


def eager_site(node, index):
    """matmul(dropout(softmax(cap(matmul(q, K.transpose(2, 3)) * scale) + mask).to(dtype)), V),
    where cap(x) is x, or softcap * tanh(x / softcap); with attention sinks
    as an extra softmax column (`sink_column`) or a rescaled output (`sink_scale`)."""
    if not _is_call(node, torch.matmul, operator.matmul):
        return None
    chain = []
    probs = _before(node.args[0], chain, "to", "type", "type_as", F.dropout)
    sliced = _is_call(probs, operator.getitem) and probs.args[1] == (Ellipsis, slice(None, -1, None))
    if sliced:                   # probs[..., :-1]: the sink column dropped
        chain.append(probs)
        probs = probs.args[0]
    if not _is_call(probs, F.softmax, "softmax", torch.softmax):
        return None
    chain.append(probs)
    scores = without_row_max(probs.args[0], chain)
    sinks = None
    if sliced:
        if (found := sink_column(scores)) is None:
            return None
        scores, sinks, nodes = found
        chain += nodes
    if (found := _eager_scores(scores, chain)) is None:
        return None
    q, kt, mask, scale, softcap = found
    site = AttentionSite(index, "eager", node, q, None, None, mask=mask, scale=scale, softcap=softcap,
                         sinks=sinks)
    if sinks is None and len(node.users) == 1 and \
            (found := sink_scale(next(iter(node.users)), node, probs.args[0])) is not None:
        site.output, site.sinks, nodes = found
        chain += [node] + nodes
    site.chain += chain
    if _escapes(site, chain):
        return site
    _attach_kv(site, kt.args[0], node.args[1])
    return site


def _before(node, chain: list, *targets):
    """The first node up args[0] that is not a call to one of `targets` (casts,
    views, inference-mode dropout), each passed node added to chain; None at
    a dropout active in training (left exact; F.dropout's p defaults to 0.5)."""
    while _is_call(node, *targets):
        if _is_call(node, F.dropout) and node.kwargs.get("training", False) and \
                node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5):
            return None
        chain.append(node)
        node = node.args[0]
    return node


def _eager_scores(scores, chain: list):
    """cap(matmul(q, K.transpose(2, 3)) * scale) + mask, its nodes added to
    chain: (q, the transpose, mask, scale, softcap), or None."""
    mask = None
    if _is_call(scores, operator.add, torch.add):
        chain.append(scores)
        scores, mask = scores.args[0], scores.args[1]
    softcap = soft_cap(scores)
    if softcap is not None:
        tanh = scores.args[0]
        chain += [scores, tanh, tanh.args[0]]
        scores = tanh.args[0].args[0]
    scale = 1.0
    if _is_call(scores, operator.mul, torch.mul, operator.truediv, torch.div):
        chain.append(scores)
        factor = scores.args[1]
        if not isinstance(factor, (int, float)):
            return None
        scale = float(factor) if scores.target in (operator.mul, torch.mul) else 1.0 / float(factor)
        scores = scores.args[0]
    if not _is_call(scores, torch.matmul, operator.matmul):
        return None
    chain.append(scores)
    q, kt = scores.args
    if not (_is_call(kt, "transpose", torch.transpose) and
            tuple(sorted(kt.args[1:3])) in ((2, 3), (-2, -1))):
        return None
    chain.append(kt)
    return q, kt, mask, scale, softcap


def bmm_site(node, index):
    """Heads flattened into the batch (XGLM, TrOCR):

        q3, K3, V3 = (x.reshape(B * H, -1, d) for x in (q, K, V))      # q, K, V [B, H, T, d]
        s = bmm(q3, K3.transpose(1, 2)).view(B, H, T, S) + mask
        s = max(s, full((), finfo.min)).view(B * H, T, S)                (a no-op clamp)
        out = bmm(dropout(softmax(s, -1).view(...).view(...)), V3).view(B, H, T, d)

    The site's output is the last view, the attention of the 4-D q, K, V."""
    if not _is_call(node, "view", "reshape") or not _is_call(node.args[0], torch.bmm):
        return None
    out4, pv = _value(node), node.args[0]
    if out4 is None or out4.dim() != 4:
        return None
    chain = [pv]
    probs = _before(pv.args[0], chain, F.dropout, "view", "reshape", "to")
    if not _is_call(probs, F.softmax, "softmax", torch.softmax) or not _last_dim(probs):
        return None
    chain.append(probs)
    scores = probs.args[0]
    while _is_call(scores, "view", "reshape") or _min_clamp(scores):
        chain.append(scores)
        scores = scores.args[0]
    mask = None
    if _is_call(scores, operator.add, torch.add):
        chain.append(scores)
        scores, mask = scores.args
        while _is_call(scores, "view", "reshape"):
            chain.append(scores)
            scores = scores.args[0]
    if not _is_call(scores, torch.bmm):
        return None
    chain.append(scores)
    q3, kt = scores.args
    if not (_is_call(kt, "transpose", torch.transpose) and tuple(sorted(kt.args[1:3])) == (1, 2)):
        return None
    chain.append(kt)
    q, k, v = (_unflattened(x, chain) for x in (q3, kt.args[0], pv.args[1]))
    if q is None or k is None or v is None:
        return None
    site = AttentionSite(index, "bmm", node, q, None, None, mask=mask, scale=1.0)
    site.chain += chain
    if _escapes(site, chain):
        return site
    _attach_kv(site, k, v)
    return site


def _escapes(site: AttentionSite, chain: list) -> bool:
    """An intermediate of the attention is read outside it (attention weights
    returned with output_attentions): the site's reason says so."""
    for inner in chain:
        outside = [u for u in inner.users if u not in chain and u is not site.output]
        if outside:
            site.reason = f"intermediate {inner.name} is also used by {outside[0].name} (e.g. output_attentions)"
            return True
    return False


def _unflattened(node, chain: list):
    """x.reshape(B * H, -1, d) of a 4-D x [B, H, T, d] -> x, else None."""
    if not _is_call(node, "reshape", "view", torch.reshape):
        return None
    x = _value(node.args[0])
    flat = _value(node)
    if x is None or flat is None or x.dim() != 4 or flat.dim() != 3 or flat.shape[-1] != x.shape[-1]:
        return None
    chain.append(node)
    return node.args[0]


def _min_clamp(node) -> bool:
    """`torch.max(x, torch.full((), finfo.min))`: nothing a softmax sees."""
    if not _is_call(node, torch.max, torch.maximum) or len(node.args) != 2:
        return False
    full = node.args[1]
    return _is_call(full, torch.full) and isinstance(full.args[1], float) and full.args[1] <= -1e30


def soft_cap(node) -> float | None:
    """`tanh(x / c) * c` (logit soft-capping, Gemma 2): c, else None."""
    if not _is_call(node, operator.mul, torch.mul):
        return None
    tanh, cap = node.args[0], node.args[1]
    if not isinstance(cap, (int, float)) or not _is_call(tanh, "tanh", torch.tanh):
        return None
    inner = tanh.args[0]
    if not _is_call(inner, operator.truediv, torch.div) or inner.args[1] != cap:
        return None
    return float(cap)


def without_row_max(scores, chain: list):
    """`x - x.max(dim=-1, keepdim=True).values` -> x (a softmax does not see
    the shift); the nodes passed are appended to `chain`."""
    if not _is_call(scores, operator.sub, torch.sub):
        return scores
    row_max = scores.args[1]
    if not (_is_call(row_max, operator.getitem) and row_max.args[1] == 0 and
            _is_call(row_max.args[0], "max", torch.max) and row_max.args[0].args[0] is scores.args[0]
            and _last_dim(row_max.args[0])):
        return scores
    chain += [scores, row_max, row_max.args[0]]
    return scores.args[0]


def sink_column(combined):
    """`cat([scores, sinks.reshape(1, -1, 1, 1).expand(...)], dim=-1)` (gpt-oss:
    the sinks are a softmax column dropped after it): (scores, the [Hq] sink
    tensor, the nodes passed), else None."""
    nodes = []
    if not _is_call(combined, torch.cat) or \
            combined.kwargs.get("dim", combined.args[1] if len(combined.args) > 1 else 0) not in (-1, 3):
        return None
    tensors = combined.args[0]
    if not isinstance(tensors, (list, tuple)) or len(tensors) != 2:
        return None
    sinks = _per_head(tensors[1], nodes)
    return None if sinks is None else (tensors[0], sinks, nodes + [combined])


def sink_scale(mul, attention, scores):
    """`attention * sigmoid(logsumexp(scores, -1) - sinks.view(1, -1, 1)).unsqueeze(-1)`
    (Granite SWA: the sink as a rescaled output, which equals an extra softmax
    column): (the output node, the [Hq] sink tensor, the nodes passed), else None."""
    if not _is_call(mul, operator.mul, torch.mul) or attention not in mul.args[:2]:
        return None
    nodes = []
    node = mul.args[1] if mul.args[0] is attention else mul.args[0]
    while _is_call(node, "to", "unsqueeze", torch.unsqueeze):
        nodes.append(node)
        node = node.args[0]
    if not _is_call(node, "sigmoid", torch.sigmoid):
        return None
    nodes.append(node)
    node = node.args[0]
    while _is_call(node, "to", "float"):
        nodes.append(node)
        node = node.args[0]
    if not _is_call(node, operator.sub, torch.sub):
        return None
    nodes.append(node)
    lse, sinks = node.args[:2]
    if not (_is_call(lse, torch.logsumexp, "logsumexp") and lse.args[0] is scores and _last_dim(lse)):
        return None
    nodes.append(lse)
    sinks = _per_head(sinks, nodes)
    return None if sinks is None else (mul, sinks, nodes)


def _last_dim(reduction: fx.Node) -> bool:
    """A reduction (max, logsumexp) over the keys: dim -1 (or 3, of 4 dims)."""
    dim = reduction.kwargs.get("dim", reduction.args[1] if len(reduction.args) > 1 else None)
    return dim in (-1, 3)


def _per_head(node, nodes: list):
    """The tensor under reshapes / views / expands (the sinks of each query
    head, broadcast to the scores): appended to `nodes` on the way."""
    while _is_call(node, "reshape", "view", "expand", torch.reshape):
        nodes.append(node)
        node = node.args[0]
    value = _value(node)
    return node if isinstance(node, fx.Node) and value is not None and value.dim() == 1 else None


def _attach_kv(site: AttentionSite, key, value):
    k_chain, v_chain = [], []
    k_src = through_repeat_kv(key, k_chain)
    v_src = through_repeat_kv(value, v_chain)
    site.chain += k_chain + v_chain
    site.key, site.value = kv_append(k_src), kv_append(v_src)
    if site.key is None or site.value is None:
        src = k_src if site.key is None else v_src
        if _static_cache_write_feeding(src):
            site.reason = ("K/V come from a StaticCache (index_copy_ into a cache-owned buffer): "
                           "that buffer is not a graph output, so it stays exact")
        else:
            site.reason = f"K/V do not come from a KV-append (found {src.name if isinstance(src, fx.Node) else src})"
        return
    for append in (site.key, site.value):
        readers = [u for u in append.past.users
                   if u is not append.node and not _sizes_for(u, site.chain) and not _dead(u)]
        if readers:        # e.g. `past.numel() > 0` (Mllama): the past is not only appended to
            site.reason = (f"the cached {append.past.name} is also read by {readers[0].name}, not only "
                           f"appended to; left exact")
            return
        users = [u for u in append.node.users if u.op != "output" and u not in site.chain
                 and u is not site.output and not _sizes_for(u, site.chain)]
        if len(users) == 1 and (keep := window_slice(users[0])) is not None:
            append.stored, append.keep = users[0], keep
            users = [u for u in append.stored.users if u.op != "output"]
        outputs = [u for u in append.stored.users if u.op == "output"]
        if users:
            site.reason = (f"the appended cache {append.node.name} is also read by {users[0].name} "
                           f"(e.g. a sliding-window slice); left exact")
            return
        if len(outputs) != 1:
            site.reason = f"the appended cache {append.node.name} is not stored back into the cache"
            return
    if site.key.compressed != site.value.compressed:
        site.reason = "K and V caches disagree (one compressed, one dense)"
        return
    q, k, v = _value(site.query), _value(site.key.node), _value(site.value.node)
    if q is not None and k is not None and q.shape[1] % k.shape[1]:
        site.reason = f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} KV heads"
        return
    if k is not None and v is not None and k.shape[-1] != v.shape[-1]:
        site.reason = f"V's head dim {v.shape[-1]} differs from K's {k.shape[-1]} (e.g. MiMo's v_head_dim)"
        return
    if site.key.keep != site.value.keep:
        site.reason = f"K and V keep different windows ({site.key.keep} and {site.value.keep} tokens)"
        return
    site.rewritable = True
    site.reason = (f"{site.form} over {'compressed cache + new tokens' if site.key.compressed else 'a new block'}"
                   f"{' via repeat_kv' if site.chain and site.form == 'sdpa' else ''}"
                   f"{f', sliding window keeping {site.key.keep} tokens' if site.key.keep else ''}"
                   f"{f', scores soft-capped at {site.softcap:g}' if site.softcap else ''}"
                   f"{', attention sinks' if site.sinks is not None else ''}")


def _sizes_for(node: fx.Node, chain: list) -> bool:
    """node is a size query (`x.size()`, `x.size(d)`, its items) read only
    by nodes of `chain` (e.g. repeat_kv's expand, with symbolic lengths):
    it goes away with them."""
    if not _is_call(node, "size", operator.getitem) or \
            (_is_call(node, operator.getitem) and not _is_call(node.args[0], "size", operator.getitem)):
        return False
    return all(u in chain or _sizes_for(u, chain) for u in node.users)


def _dead(node: fx.Node) -> bool:
    """Nothing in the graph needs node: it and every node reading it are pure
    and end unread (e.g. `past.numel()` whose value only fed a guard),
    so dead-code elimination drops them."""
    if node.op == "output" or node.is_impure():
        return False
    return all(_dead(u) for u in node.users)


def _static_cache_write_feeding(node) -> bool:
    """node (or the tensor it slices) is written by index_copy_/index_put_."""
    while _is_call(node, operator.getitem):
        node = node.args[0]
    return isinstance(node, fx.Node) and (
        _static_cache_write(node) or any(_static_cache_write(u) for u in node.users))


def find_sites(graph: fx.Graph) -> list[AttentionSite]:
    """Every attention site in `graph`, in order, rewritable or with a reason,
    and every softmax or KV-append no site covers (`unknown_sites`)."""
    sites = []
    for node in graph.nodes:
        site = sdpa_site(node, len(sites)) or eager_site(node, len(sites)) or bmm_site(node, len(sites))
        if site is not None:
            sites.append(site)
    return sites + unknown_sites(graph, sites, len(sites))


# ---- what no form covers --------------------------------------------------
# score transforms that set an attention apart from the forms above
_SCORE_FEATURES = (
    (("tanh", torch.tanh), "soft-capped scores (tanh)"),
    (("baddbmm", torch.baddbmm), "scores through baddbmm (e.g. ALiBi)"),
    (("bmm", torch.bmm), "scores through bmm (heads flattened into the batch)"),
    ((torch.einsum,), "scores through einsum"),
    (("float", "to", "type"), "scores upcast to another dtype"),
)


def unknown_sites(graph: fx.Graph, sites: list[AttentionSite], first: int) -> list[AttentionSite]:
    """A site for each softmax outside every recognised site's chain (the
    attention forms the matcher does not read) and each KV-append no site
    consumes, with the reason found on the way to its scores."""
    covered = {n for site in sites for n in site.chain} | {site.output for site in sites}
    appends = {a.node for site in sites for a in (site.key, site.value) if a is not None}
    unknown = []
    for node in graph.nodes:
        if _is_call(node, F.softmax, "softmax", torch.softmax) and node not in covered \
                and _scores_of_a_product(node):
            reason = f"attention form not recognised ({_score_features(node)}); left exact"
        elif kv_append(node) is not None and node not in appends and \
                any(u.op == "output" for u in node.users):
            reason = "a KV-append whose attention was not recognised; left exact"
        else:
            continue
        site = AttentionSite(first + len(unknown), "unknown", node, None, None, None, reason=reason)
        unknown.append(site)
    return unknown


# what makes a softmax an attention's: its scores are a product of two
# activations (q and K), not a linear layer's output (a MoE router's logits)
_PRODUCTS = (torch.matmul, operator.matmul, "matmul", torch.bmm, "bmm", torch.baddbmm, "baddbmm",
             torch.einsum)


def _scores_of_a_product(softmax: fx.Node, depth: int = 8) -> bool:
    """A product of two tensors lies on the way back from `softmax` along
    first operands within `depth` nodes."""
    node = softmax.args[0]
    for _ in range(depth):
        if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method"):
            return False
        if _is_call(node, *_PRODUCTS):
            return True
        node = node.args[0] if node.args else None
    return False


def _score_features(softmax: fx.Node, depth: int = 8) -> str:
    """What, among `_SCORE_FEATURES`, lies on the way from `softmax` back
    along its first operands (the scores' path) for `depth` nodes."""
    found, node = [], softmax.args[0]
    for _ in range(depth):
        if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method"):
            break
        for targets, text in _SCORE_FEATURES:
            if _is_call(node, *targets) and text not in found:
                found.append(text)
        node = node.args[0] if node.args else None
    return ", ".join(found) or f"scores from {softmax.args[0]}"
