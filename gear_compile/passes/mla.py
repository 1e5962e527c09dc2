"""Absorbed attention over an MLA layer's compressed latent cache.

An MLA layer (DeepSeek V2 / V3, MiniCPM3, GLM-4 MoE lite, LongCat, Kimi
K2-style) caches one latent c [B, 1, L, r] and one rotary key part
k_pe [B, 1, L, d_r] a token, shared by its H heads, and up-projects the
latent every step (transformers' `expand_kv`):

    kv = linear(c, W).view(B, L, H, d_n + d_v).transpose(1, 2)
    k_nope, v = kv.split([d_n, d_v], dim=-1)
    K = [k_nope, k_pe.expand(-1, H, -1, -1)]      (new_empty and two copy_, or a cat)
    out = attention(q, K, v)                      (q = [q_nope, q_pe], sdpa or eager)

`passes.sites` makes the cache's two appends a rebuild site: the store is
compressed and decompressed in front of its append each step. Where the
attention reading them is this form, W is absorbed into the query and the
output instead (DeepSeek-V2, section 2.1.2):

    q_lat = q_nope W_uk                                   [B, H, T, r]
    o_lat = softmax(scale [q_lat, q_pe] [c, k_pe]^T + mask) c     (one KV head for all H)
    out   = o_lat W_uv^T (+ the bias of W's v rows)       [B, H, T, d_v]

W_uk and W_uv are each head's rows of W for k_nope and for v. The per-head
K and V of the past (H (d_n + d_v) channels a token, where the cache holds
r + d_r) are never built: a step's multiply-adds over the past fall from
L r H (d_n + d_v) for the up-projection alone to L H (2 r + d_r). A bias on
W's k rows adds the same q_nope . b_k to every score of a query, which the
softmax cancels; one on its v rows passes through, as the probabilities sum
to one. Soft-capped scores and sink logits would not cancel it: those
attentions keep the rebuild.

Neighbours: `passes.sites` (the rebuild site and `readers`, the attention
left as written over its appends), `passes.rewrite` (`absorb` at a decode
rebuild site), `backend` (`annotate`, so `explain` says which sites absorb;
`leave_windows_exact`, as only an absorbed sliding window is trusted rebuilt).
The option `mla_absorb=False` keeps the rebuild (the tests and
`benchmarks/mla_decode.py` compare the two).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from .match import KV, TRANSPOSE, VIEWS, AttentionSite, _cat_on, _swaps
from .pattern import Call, Capture, example_value, is_call, match

SPLIT = (torch.split, torch.functional.split, "split")
LINEAR = (F.linear, torch._C._nn.linear)

# kv = linear(c, W).view(B, L, H, d_n + d_v).transpose(1, 2); its split's parts
UP_PROJECTION = Call(TRANSPOSE, Call(VIEWS, Call(LINEAR, Capture("latent"), Capture("weight"), name="linear")),
                     check=_swaps((1, 2)))


def _part(i: int):
    return Call(operator.getitem, Call(SPLIT, Capture("kv", UP_PROJECTION), Capture("sizes"), name="split"), i)


VALUES = _part(1)
ROPE = Call("expand", Capture("rope"))
KEYS_CAT = Call(torch.cat, [_part(0), ROPE], check=_cat_on(-1, 3))


@dataclass
class MLAForm:
    """An MLA up-projection and the attention reading it, as `absorb` needs them."""

    reader: AttentionSite           # the attention over the expanded K / V
    weight: fx.Node                 # W [H (d_n + d_v), r]
    bias: fx.Node | None
    heads: int
    nope: int                       # d_n: W's k rows per head (q's first channels)
    value_dim: int                  # d_v
    expansion: list                 # the nodes from the up-projection to K / V, erased once absorbed


def annotate(sites: list[AttentionSite]) -> dict[int, MLAForm]:
    """The MLA form of each rewritable rebuild site that has one, by site
    index; those sites' reasons say so."""
    forms = {}
    for site in sites:
        if site.form != "rebuild" or not site.rewritable:
            continue
        form = find(site)
        if isinstance(form, MLAForm):
            forms[site.index] = form
            when = "attention absorbed" if site.key.compressed else "decode steps absorb the attention"
            site.reason = (f"MLA latent cache compressed; {when} (q W_uk over the latent and rotary key "
                           f"part, the output through W_uv): the past's per-head K / V are not rebuilt; "
                           f"{form.heads} heads, latent {_width(site.key.node)} + rope "
                           f"{_width(site.value.node)} a token")
    return forms


def leave_windows_exact(sites: list[AttentionSite], forms: dict[int, MLAForm]) -> None:
    """A sliding-window rebuild site (its cache keeps the append's last
    tokens) stays rewritten only where its attention is absorbed (dots3's
    windowed MLA layers, `forms`): the model's own attention over a rebuilt
    window changed Inkling2's tokens under method none after a dozen steps
    (cause not found: its window's relative position bias and conv states
    are suspects; a windowed Mistral under an einsum attention stayed exact),
    so such a window is left exact, and says so."""
    for site in sites:
        if site.form == "rebuild" and site.rewritable and site.key.keep is not None and site.index not in forms:
            site.rewritable = False
            reader = f" ({site.readers[0].form}: {site.readers[0].reason})" if site.readers else ""
            site.reason = (f"a sliding-window cache ({site.key.keep} tokens kept) read by an attention the MLA "
                           f"form does not absorb{reader}: a rebuilt window under the model's own attention is "
                           f"not trusted exact (it changed Inkling2's tokens); left exact")


def find(site: AttentionSite) -> MLAForm | str:
    """The MLA form over the rebuild site's appends (keys: the latent, values:
    the rotary key part), or why the site is not one."""
    if len(site.readers) != 1 or site.readers[0].form not in ("sdpa", "eager") or len(site.readers[0].reads) != 2:
        return "no single sdpa or eager attention reads the rebuilt cache"
    reader = site.readers[0]
    if reader.softcap is not None or reader.sink_logits is not None:
        return "its scores are soft-capped or have sink logits, which a bias on W's k rows would not cancel through"
    key, value = (match(KV, x) for x in reader.reads)
    if not (key and value):
        return "K / V are not read plainly"
    v = match(VALUES, value["kv"])
    if not v or v["latent"] is not site.key.node:
        return f"V is not the latent's up-projection ({getattr(v, 'reason', 'another tensor')})"
    k = match(KEYS_CAT, key["kv"], **v)
    if not k and (assembled := _assembled(key["kv"], v)) is not None:
        k = assembled            # two writes into new_empty: their match, or the Miss that says which
    if not k or k["rope"] is not site.value.node:
        return f"K is not [k_nope, rotary key part] ({getattr(k, 'reason', 'another tensor')})"
    return _form(reader, k, [*key.nodes, *value.nodes, *v.nodes, *k.nodes]) or \
        "the shapes are not MLA's (W [H (d_n + d_v), r], q [B, H, T, d_n + d_r])"


def _assembled(key: fx.Node, v: dict):
    """K = kv.new_empty(...) written in two halves: K[..., :d_n].copy_(k_nope),
    K[..., d_n:].copy_(k_pe.expand(...)). The match of both writes, a Miss of
    one, or None where K is not assembled so."""
    if not is_call(key, "new_empty") or key.args[0] is not v["kv"]:
        return None
    nope = v["sizes"][0]
    halves = {}
    for part in (u for u in key.users if is_call(u, operator.getitem)):
        copies = [c for c in part.users if is_call(c, "copy_") and c.args[0] is part]
        if len(copies) != 1 or len(part.users) != 1:
            return None
        index = part.args[1]
        if isinstance(index, tuple) and len(index) == 2 and index[0] is Ellipsis and isinstance(index[1], slice):
            halves[(index[1].start, index[1].stop)] = (part, copies[0])
    if set(halves) != {(None, nope), (nope, None)}:
        return None
    first = match(_part(0), halves[(None, nope)][1].args[1], **v)
    second = match(ROPE, halves[(nope, None)][1].args[1])
    if not (first and second):
        return first or second
    first.update(second)
    first.nodes += [key, *second.nodes, *(n for pair in halves.values() for n in pair)]
    return first


def _form(reader: AttentionSite, k: dict, expansion: list) -> MLAForm | None:
    q, w = example_value(reader.query), example_value(k["weight"])
    kv, latent, rope = example_value(k["kv"]), example_value(k["latent"]), example_value(k["rope"])
    sizes, linear = k["sizes"], k["linear"]
    if None in (q, w, kv, latent, rope) or not isinstance(sizes, (list, tuple)) or len(sizes) != 2 \
            or not all(isinstance(s, int) for s in sizes):
        return None
    heads, (nope, value_dim) = kv.shape[1], sizes
    if w.dim() != 2 or w.shape[0] != heads * (nope + value_dim) or w.shape[1] != latent.shape[-1] or \
            latent.shape[1] != 1 or rope.shape[1] != 1 or q.shape[1] != heads or \
            q.shape[-1] != nope + rope.shape[-1] or q.dtype != example_value(reader.output).dtype:
        return None
    bias = linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")
    return MLAForm(reader, k["weight"], bias, heads, nope, value_dim, expansion)


def _width(node: fx.Node):
    return example_value(node).shape[-1]


def absorb(graph: fx.Graph, form: MLAForm, node, latent: fx.Node, rope: fx.Node) -> fx.Node:
    """Emit the absorbed attention over `latent` [B, 1, L, r] and `rope`
    [B, 1, L, d_r] (the appends, the past decompressed) in place of the
    reader's output, and erase the up-projection; `node` maps the matched
    graph's nodes into `graph`. Returns the new [B, H, T, d_v] output."""
    reader, h, n = form.reader, form.heads, form.nope
    out = node(reader.output)
    call, method = graph.call_function, graph.call_method
    with graph.inserting_before(out):
        w = method("view", (node(form.weight), h, n + form.value_dim, -1))           # [H, d_n + d_v, r]
        w_uk = call(operator.getitem, (w, (slice(None), slice(0, n))))
        w_uv = method("transpose", (call(operator.getitem, (w, (slice(None), slice(n, None)))), 1, 2))
        q_nope, q_pe = _query_parts(graph, node(reader.query), n)
        q = call(torch.cat, ([call(torch.matmul, (q_nope, w_uk)), q_pe],), {"dim": -1})
        keys = call(torch.cat, ([latent, rope],), {"dim": -1})
        scale = node(reader.scale) if reader.scale is not None else example_value(reader.query).shape[-1] ** -0.5
        mixed = call(F.scaled_dot_product_attention, (q, keys, latent), {
            "attn_mask": node(reader.mask), "scale": scale, "is_causal": bool(reader.is_causal),
            "enable_gqa": True})
        absorbed = call(torch.matmul, (mixed, w_uv))
        if form.bias is not None:
            b = method("view", (node(form.bias), h, 1, n + form.value_dim))
            absorbed = call(operator.add, (absorbed, call(operator.getitem, (b, (Ellipsis, slice(n, None))))))
    absorbed.meta["example_value"] = example_value(reader.output)
    out.replace_all_uses_with(absorbed)
    _erase(graph, {node(x) for x in (reader.output, *reader.chain, *form.expansion)})
    return absorbed


def _query_parts(graph: fx.Graph, q: fx.Node, nope: int) -> tuple[fx.Node, fx.Node]:
    """q's d_n and d_r parts: the two tensors it was concatenated from (the
    model's q_nope and rotated q_pe), else slices of it."""
    parts = q.args[0] if is_call(q, torch.cat) else None
    if isinstance(parts, (list, tuple)) and len(parts) == 2 and \
            all(isinstance(p, fx.Node) and example_value(p) is not None for p in parts) and \
            example_value(parts[0]).shape[-1] == nope and _cat_on(-1, 3)(q) is None:
        return parts[0], parts[1]
    return (graph.call_function(operator.getitem, (q, (Ellipsis, slice(0, nope)))),
            graph.call_function(operator.getitem, (q, (Ellipsis, slice(nope, None)))))


def _erase(graph: fx.Graph, nodes: set) -> None:
    """Erase `nodes` that nothing outside them reads, users first (their
    in-place copies too, which dead-code elimination keeps)."""
    for x in reversed(list(graph.nodes)):
        if x in nodes and not x.users:
            graph.erase_node(x)
