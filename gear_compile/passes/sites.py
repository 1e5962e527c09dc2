"""Every site of a captured graph: the recognised attentions (`match`), and
the caches and softmaxes no recognised form fuses.

`find_sites` is what the backend calls. To `match.recognised_sites` it adds:
- rebuild sites: a layer's pair of KV-appends read by something other than
  a fusable attention (MLA's latent up-projection, ALiBi scores through
  baddbmm, an attention whose reason keeps it exact). The cache is compressed
  and each decode step rebuilds the past densely before the append, so the
  reader reads what it read before; `_absorbed` folds that reader into its
  rebuild site's report;
- unknown sites: a softmax over a product of two tensors outside every
  recognised chain, or a KV-append nothing takes, each with what sets it
  apart, so an attention the matcher cannot read is reported, never silently
  skipped.
Neighbours: `match` (the forms, `AttentionSite`, `KVAppend`), `mla` (absorbs
rebuild sites whose reader is MLA's latent attention), `rewrite` (acts on
the rewritable sites).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from .match import (AttentionSite, KVAppend, is_dead, kv_append, module_of, other_layers_reader,
                    recognised_sites, window_slice)
from .pattern import is_call


def find_sites(graph: fx.Graph) -> list[AttentionSite]:
    """Every attention site in `graph`, in order, rewritable or with a reason,
    and every softmax or KV-append no site covers (`unknown_sites`)."""
    sites = recognised_sites(graph)
    sites += rebuild_sites(graph, sites, len(sites))
    return _absorbed(sites + unknown_sites(graph, sites, len(sites)))


# ---- caches read by something other than a recognised attention -----------
def rebuild_sites(graph: fx.Graph, sites: list[AttentionSite], first: int) -> list[AttentionSite]:
    """A "rebuild" site for each pair of KV-appends (a cache update's keys
    then values) that no rewritable site consumes (those of a recognised
    attention that cannot be fused too: V split into halves, a mask computed
    from the appended V), whose pasts are only appended to and whose appends
    are stored back whole: the cache is
    compressed, and each decode step rebuilds its past densely in front of
    the append, so whatever reads the append (MLA's latent up-projection,
    ALiBi scores through baddbmm, a differential attention) reads what it
    read before, from the compressed cache. The attention is not fused with
    the store: the past is materialised for the step."""
    taken = {a.node for site in sites if site.rewritable for a in (site.key, site.value)}
    appends = [a for a in map(_kept_append, graph.nodes) if a is not None and a.node not in taken]
    found, pending = [], None
    for append in appends:
        if pending is None:
            pending = append
            continue
        site = AttentionSite(first + len(found), "rebuild", pending.node, None, pending, append)
        site.reason = _rebuilds(pending) or _rebuilds(append) or _one_layer(pending, append) or \
            _consistent_pasts(site) or \
            next((f"its attention's {r.reason}" for r in _readers(site, sites) if _escaping_reason(r)), "")
        if not site.reason:
            site.rewritable = True
            site.reason = (f"cache compressed, read back densely before {_reader(pending)} / {_reader(append)} "
                           f"(the attention that reads it is not fused: {_why_not_attention(pending, sites)})")
            found.append(site)
            pending = None
        else:
            pending = append     # not a pair: the next append may start one
    return found


def _absorbed(sites: list[AttentionSite]) -> list[AttentionSite]:
    """`sites` less the attentions (recognised but not rewritable, or
    unknown) of a rebuild site's layer that read its appends: they run as
    the model wrote them, over the rebuilt past, and the rebuild site says so."""
    gone = set()
    for rebuild in (s for s in sites if s.form == "rebuild" and s.rewritable):
        readers = _readers(rebuild, sites)
        if readers:
            rebuild.reason = rebuild.reason.rsplit(" (the attention", 1)[0] + \
                f" (the attention that reads it, left as written: {readers[0].form}: {readers[0].reason})"
            rebuild.readers = readers
            gone.update(id(s) for s in readers)
    return [s for s in sites if id(s) not in gone]


def _readers(rebuild: AttentionSite, sites: list[AttentionSite]) -> list[AttentionSite]:
    """The sites left exact, in the rebuild site's layer, computed from its appends."""
    reached = _downstream([rebuild.key.node, rebuild.value.node])
    return [s for s in sites if s.form != "rebuild" and not s.rewritable and s.output in reached
            and s.layer == rebuild.layer]


def _escaping_reason(site: AttentionSite) -> bool:
    """Its attention's weights are read outside it (output_attentions): the
    user asked for that attention as written; its cache is left exact too."""
    return site.reason.startswith("intermediate ")


def _downstream(nodes: list[fx.Node], limit: int = 400) -> set:
    """Nodes computed from `nodes` (within `limit`), through in-place writes
    too: `buffer[..., :d].copy_(x)` makes `buffer` computed from x."""
    seen, frontier = set(), list(nodes)
    while frontier and len(seen) < limit:
        node = frontier.pop()
        if node in seen or node.op == "output":
            continue
        seen.add(node)
        for user in node.users:
            frontier.append(user)
            if user.op in ("call_method", "call_function") and str(getattr(user.target, "__name__", user.target)) \
                    .endswith("_") and user.args and isinstance(user.args[0], fx.Node):
                written = user.args[0]
                while is_call(written, operator.getitem):
                    written = written.args[0]
                frontier.append(written)
    return seen


def _rebuilds(append: KVAppend) -> str | None:
    """Why the cache of `append` cannot be compressed and rebuilt: its past is
    read by more than its append and size queries (the rebuilt past answers
    those: `cache.get_seq_length()` reads the first layer's keys' length), or
    the append is not stored back once."""
    readers = [u for u in append.past.users if u is not append.node and not is_dead(u)
               and not is_call(u, "size")]
    if readers:
        return f"the cached {append.past.name} is also read by {readers[0].name}"
    if sum(u.op == "output" for u in append.stored.users) != 1:
        return f"the appended cache {append.node.name} is not stored back once"
    return None


def _kept_append(node) -> KVAppend | None:
    """`kv_append(node)` where the cache keeps the append itself or (a
    sliding-window layer) its last tokens, returned to be stored back. A
    windowed append that another layer reads (Gemma 3n's KV sharing: a later
    layer attends an earlier one's full window) is not rebuilt: rebuilding it
    changed Gemma 3n's tokens under method none after a few decode steps
    (cause not found), so it stays exact. A windowed rebuild site is kept
    only where its attention is absorbed (`mla.leave_windows_exact`)."""
    append = kv_append(node)
    if append is None or any(u.op == "output" for u in node.users):
        return append
    kept = [(u, keep) for u in node.users if (keep := window_slice(u)) is not None
            and any(v.op == "output" for v in u.users)]
    if len(kept) == 1 and other_layers_reader(node, [u for u in node.users if u.op != "output"]) is None:
        append.stored, append.keep = kept[0]
        return append
    return None


def _one_layer(key: KVAppend, value: KVAppend) -> str | None:
    """Why two appends are not one layer's keys and values: they are made in
    different modules (a layer whose keys' cache cannot be rebuilt leaves its
    values' append unpaired; the next layer's keys are not their partner)."""
    paths = [module_of(a.node) for a in (key, value)]
    if None not in paths and paths[0] != paths[1]:
        return f"{key.node.name} and {value.node.name} are appended in different layers ({paths[0]}, {paths[1]})"
    return None


def _consistent_pasts(site: AttentionSite) -> str | None:
    if site.key.compressed != site.value.compressed:
        return "K and V caches disagree (one compressed, one dense)"
    return None


def _reader(append: KVAppend) -> str:
    readers = [u.name for u in append.node.users if u.op != "output"]
    return readers[0] if readers else "nothing"


def _why_not_attention(append: KVAppend, sites: list[AttentionSite]) -> str:
    """The reason of the recognised site over these K/V, if any, else what reads them."""
    reasons = [s.reason for s in sites if not s.rewritable and s.key is not None and s.key.node is append.node]
    return reasons[0] if reasons else f"no attention form reads {append.node.name} directly"


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
    consumes, with the reason found on the way to its scores (an append's:
    why no rebuild site took it)."""
    covered = {n for site in sites for n in site.chain} | {site.output for site in sites}
    appends = {a.node for site in sites for a in (site.key, site.value) if a is not None}
    unknown = []
    for node in graph.nodes:
        if is_call(node, F.softmax, "softmax", torch.softmax) and node not in covered \
                and _scores_of_a_product(node):
            reason = f"attention form not recognised ({_score_features(node)}); left exact"
        elif (append := _kept_append(node)) is not None and node not in appends:
            reason = (f"a KV-append whose attention was not recognised; left exact, its cache not rebuilt: "
                      f"{_rebuilds(append) or 'no other append of its layer to pair it with'}")
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
        if is_call(node, *_PRODUCTS):
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
            if is_call(node, *targets) and text not in found:
                found.append(text)
        node = node.args[0] if node.args else None
    return ", ".join(found) or f"scores from {softmax.args[0]}"
