"""Find attention sites and the KV-appends feeding them in a Dynamo FX graph.

The graph is Dynamo's torch-level graph (torch functions and tensor methods).
Each recognised form is declared as the code it matches (`passes.pattern`):

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
                 ... with sink logits: a softmax column    (gpt-oss)
                     or the output times sigmoid(lse - sink_logit)   (Granite SWA)

The patterns carry the forms' names (KV_APPEND, KV, EAGER, SINK_LOGIT_COLUMN,
SINK_LOGIT_SCALE, BMM), each built from smaller ones as the model's code is,
with validity checks (`_swaps`, `_training_dropout`, ...) as functions that return
why a node does not fit; `sdpa_site`, `eager_site`, `bmm_site` read a match's
captures into an `AttentionSite`. A new form is a new pattern and, where it
has a new site field, the line reading it.

`recognised_sites` returns every site of these forms, rewritable or not,
each with the reason; `rewrite` acts only on rewritable ones and everything
else stays exact. Neighbours: `passes.sites` (adds rebuild and unknown
sites: `find_sites`, what the backend calls), `passes.rewrite` (consumes
`AttentionSite`), `explain` (prints them).
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
from .pattern import Call, Capture, Either, Maybe, Through, example_value, is_call, match

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
        return isinstance(example_value(self.past), CompressedKV)


@dataclass
class AttentionSite:
    index: int
    form: str                       # "sdpa", "eager", "bmm", "rebuild" (a cache read back densely),
                                    # or "unknown" (reported, never rewritten)
    output: fx.Node                 # node holding the attention output [B, Hq, T, D]
    query: fx.Node
    key: KVAppend | None
    value: KVAppend | None
    mask: fx.Node | None = None
    scale: float | None = None
    is_causal: bool = False
    softcap: float | None = None    # scores -> softcap * tanh(scores / softcap), before the mask
    sink_logits: fx.Node | None = None  # one logit per query head [Hq]: an extra softmax column, no value
    reason: str = ""
    rewritable: bool = False
    chain: list = field(default_factory=list)   # nodes between K/V and the output
    reads: tuple = ()               # the K and V nodes the attention reads (before `KV`'s repeat / upcast)
    readers: list = field(default_factory=list)  # a rebuild site's: the attentions left as written
                                                 # that read its appends (`sites._absorbed`)

    @property
    def layer(self) -> str:
        return module_of(self.output) or f"site {self.index}"

    @property
    def cache_layer(self) -> str | None:
        """The cache layer whose past the site reads, from its placeholder's
        source (`...cache.layers[3].keys` -> "3"): the same in every graph,
        where `layer` (a module path) is relative to a frame resumed after a
        graph break (Dbrx's MoE: both layers' attention "norm_attn_norm.attn")."""
        past = self.key.past if self.key is not None else None
        if not isinstance(past, fx.Node) or past.op != "placeholder":
            return None
        name = getattr(getattr(past, "_dynamo_source", None), "name", None)    # a property, a method before
        name = name() if callable(name) else name
        found = re.search(r"layers\W*(\d+)", name if isinstance(name, str) else past.name)
        return found.group(1) if found else None

    @property
    def head_dim(self) -> int:
        """The narrower of K's and V's head dims (a rebuild site's stores may differ: MLA's latent
        and rope key part): the one the codec's groups must fit."""
        return min(example_value(a.new).shape[-1] for a in (self.key, self.value) if a is not None)

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


MATMUL, SOFTMAX, TRANSPOSE = (torch.matmul, operator.matmul), (F.softmax, "softmax", torch.softmax), \
    ("transpose", torch.transpose)
ADD, SUB, MUL, DIV = (operator.add, torch.add), (operator.sub, torch.sub), (operator.mul, torch.mul), \
    (operator.truediv, torch.div)
VIEWS = ("view", "reshape")


# ---- validity checks: None, or why the node does not fit -------------------
def _number(x) -> str | None:
    return None if isinstance(x, (int, float)) else f"{x} is not a number"


def _swaps(*pairs):
    """A transpose of one of the dim `pairs` (in either order)."""
    def check(node):
        dims = tuple(node.args[1:3])
        return None if tuple(sorted(dims)) in pairs else f"transposes dims {dims}, not {pairs[0]}"
    return check


def _cat_on(*dims):
    """A torch.cat along one of `dims`."""
    def check(cat):
        dim = cat.kwargs.get("dim", cat.args[1] if len(cat.args) > 1 else 0)
        return None if dim in dims else f"concatenates along dim {dim}, not {dims[0]}"
    return check


def _over_keys(reduction) -> str | None:
    """A reduction (softmax, max, logsumexp) over the keys: dim -1 (or 3, of 4 dims)."""
    dim = reduction.kwargs.get("dim", reduction.args[1] if len(reduction.args) > 1 else None)
    return None if dim in (-1, 3) else f"reduces dim {dim}, not the keys'"


def _training_dropout(node) -> str | None:
    """F.dropout active in training (its p defaults to 0.5): its attention is left exact."""
    if is_call(node, F.dropout) and node.kwargs.get("training", False) and \
            (p := node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)):
        return f"dropout active in training (p={p})"
    return None


def _copy_or_fp32_upcast(node) -> str | None:
    """`x.contiguous()`, `x.float()` or `x.to(torch.float32)`: every kernel
    computes in fp32 from the stored values, so the upcast changes nothing."""
    if is_call(node, "contiguous") or is_call(node, "float") and len(node.args) == 1 and not node.kwargs:
        return None
    dtype = node.kwargs.get("dtype", node.args[1] if len(node.args) == 2 else None)
    if is_call(node, "to") and dtype is torch.float32 and len(node.args) <= 2 and set(node.kwargs) <= {"dtype"}:
        return None
    return "not a copy or an upcast to fp32"


def _new_axis(index) -> str | None:
    return None if isinstance(index, tuple) and None in index else f"{index} adds no axis"


def _one_per_head(node) -> str | None:
    value = example_value(node)
    return None if value is not None and value.dim() == 1 else f"{node} is not one value a head"


def _heads_into_batch(node) -> str | None:
    """x.reshape(B * H, -1, d) of a 4-D x [B, H, T, d]."""
    x, flat = example_value(node.args[0]), example_value(node)
    if x is None or flat is None or x.dim() != 4 or flat.dim() != 3 or flat.shape[-1] != x.shape[-1]:
        return "does not flatten 4-D heads into the batch"
    return None


def _four_dims(node) -> str | None:
    value = example_value(node)
    return None if value is not None and value.dim() == 4 else "not a 4-D attention output"


def _view_or_min_clamp(node) -> str | None:
    """A view, or `torch.max(x, torch.full((), finfo.min))`: nothing a softmax sees."""
    full = node.args[1] if len(node.args) == 2 else None
    if is_call(node, *VIEWS) or \
            is_call(full, torch.full) and isinstance(full.args[1], float) and full.args[1] <= -1e30:
        return None
    return "not a clamp at the dtype's minimum"


# ---- K/V forms --------------------------------------------------------------
# torch.cat([past, new], dim=-2 or 2)
KV_APPEND = Call(torch.cat, [Capture("past"), Capture("new")], check=_cat_on(-2, 2))

# repeat_kv(kv) = kv[:, :, None, :, :].expand(...).reshape(...) -> kv, or kv; under .contiguous() or an fp32 upcast
REPEAT_KV = Call(("reshape", torch.reshape), Call("expand", Call(operator.getitem, Capture("kv"),
                                                                 Capture("index", check=_new_axis))))
KV = Through(("contiguous", "float", "to"), Either(REPEAT_KV, Capture("kv")), check=_copy_or_fp32_upcast)

# ---- attention forms --------------------------------------------------------
# eager: cap(matmul(q, K.transpose(2, 3)) * scale) + mask, where cap(x) is x or softcap * tanh(x / softcap)
QK = Call(MATMUL, Capture("query"), Call(TRANSPOSE, Capture("key"), check=_swaps((2, 3), (-2, -1))))
SCALED = Maybe(Call(MUL + DIV, QK, Capture("factor", check=_number), name="scaling"))
CAPPED = Either(Call(MUL, Call(("tanh", torch.tanh), Call(DIV, SCALED, Capture("softcap", check=_number))),
                     Capture("softcap")), SCALED)
SCORES = Maybe(Call(ADD, CAPPED, Capture("mask")))


def less_row_max(scores):
    """`x - x.max(dim=-1, keepdim=True).values` (a softmax does not see the shift), or x."""
    return Maybe(Call(SUB, Capture("unshifted", scores),
                      Call(operator.getitem, Call(("max", torch.max), Capture("unshifted"), check=_over_keys), 0)))


# the sink logit of each query head, broadcast to the scores
PER_HEAD = Through(("reshape", "view", "expand", torch.reshape), Capture("sink_logits", check=_one_per_head))
# gpt-oss: the sink logits as a softmax column, dropped after it
SINK_LOGIT_COLUMN = Call(torch.cat, [SCORES, PER_HEAD], check=_cat_on(-1, 3))
PROBS = Either(
    Call(operator.getitem, Call(SOFTMAX, less_row_max(SINK_LOGIT_COLUMN), name="probs"), (Ellipsis, slice(None, -1))),
    Call(SOFTMAX, less_row_max(SCORES), name="probs"))
# matmul(dropout(softmax(scores).to(dtype)), V)
EAGER = Call(MATMUL, Through(("to", "type", "type_as", F.dropout), PROBS, check=_training_dropout),
             Capture("value"))

# Granite SWA: attention * sigmoid(logsumexp(scores, -1) - sinks.view(1, -1, 1)).unsqueeze(-1),
# which equals a sink-logit column
_LSE_LESS_SINK_LOGIT = Call(SUB, Call((torch.logsumexp, "logsumexp"), Capture("scores"), check=_over_keys), PER_HEAD)
_GATE = Through(("to", "unsqueeze", torch.unsqueeze),
                Call(("sigmoid", torch.sigmoid), Through(("to", "float"), _LSE_LESS_SINK_LOGIT)))
SINK_LOGIT_SCALE = Either(Call(MUL, Capture("attention"), _GATE), Call(MUL, _GATE, Capture("attention")))


def _flat(name: str):
    return Call(("reshape", "view", torch.reshape), Capture(name), check=_heads_into_batch)


# bmm (XGLM, TrOCR), as `bmm_site` shows it
BMM_QK = Call(torch.bmm, _flat("query"), Call(TRANSPOSE, _flat("key"), check=_swaps((1, 2))))
BMM_MASKED = Either(Call(ADD, Through(VIEWS, BMM_QK), Capture("mask")), BMM_QK)
BMM_PROBS = Call(SOFTMAX, Through(VIEWS + (torch.max, torch.maximum), BMM_MASKED, check=_view_or_min_clamp),
                 check=_over_keys)
BMM = Call(VIEWS, Call(torch.bmm, Through((F.dropout, *VIEWS, "to"), BMM_PROBS, check=_training_dropout),
                       _flat("value")), check=_four_dims)


def sdpa_site(node, index):
    """F.scaled_dot_product_attention(q, K, V, attn_mask, dropout_p, is_causal, scale, enable_gqa)."""
    if not is_call(node, F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention):
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
    """`EAGER`, with sink logits as an extra softmax column (`SINK_LOGIT_COLUMN`)
    or a rescaled output (`SINK_LOGIT_SCALE`)."""
    if not (m := match(EAGER, node)):
        return None
    factor, softcap = float(m.get("factor", 1.0)), m.get("softcap")
    scale = factor if "scaling" not in m or m["scaling"].target in MUL else 1.0 / factor
    site = AttentionSite(index, "eager", node, m["query"], None, None, mask=m.get("mask"), scale=scale,
                         softcap=None if softcap is None else float(softcap), sink_logits=m.get("sink_logits"))
    chain = m.nodes[1:]
    if site.sink_logits is None and len(node.users) == 1 and \
            (gate := match(SINK_LOGIT_SCALE, next(iter(node.users)), attention=node, scores=m["probs"].args[0])):
        site.output, site.sink_logits = gate.nodes[0], gate["sink_logits"]
        chain += [node] + gate.nodes[1:]
    return _attend(site, chain, m["key"], m["value"])


def bmm_site(node, index):
    """Heads flattened into the batch (XGLM, TrOCR):

        q3, K3, V3 = (x.reshape(B * H, -1, d) for x in (q, K, V))      # q, K, V [B, H, T, d]
        s = bmm(q3, K3.transpose(1, 2)).view(B, H, T, S) + mask
        s = max(s, full((), finfo.min)).view(B * H, T, S)                (a no-op clamp)
        out = bmm(dropout(softmax(s, -1).view(...).view(...)), V3).view(B, H, T, d)

    The site's output is the last view, the attention of the 4-D q, K, V."""
    if not (m := match(BMM, node)):
        return None
    site = AttentionSite(index, "bmm", node, m["query"], None, None, mask=m.get("mask"), scale=1.0)
    return _attend(site, m.nodes[1:], m["key"], m["value"])


def _attend(site: AttentionSite, chain: list, key, value) -> AttentionSite:
    """The site, its `chain` the nodes between K/V and its output: with K/V
    attached, unless an intermediate is read outside it."""
    site.chain += chain
    if reason := _escaping(site, chain):
        site.reason = reason
    else:
        _attach_kv(site, key, value)
    return site


def _escaping(site: AttentionSite, chain: list) -> str | None:
    """An intermediate of the attention is read outside it (attention weights
    returned with output_attentions)."""
    for inner in chain:
        outside = [u for u in inner.users if u not in chain and u is not site.output]
        if outside:
            return f"intermediate {inner.name} is also used by {outside[0].name} (e.g. output_attentions)"
    return None


def kv_append(node) -> KVAppend | None:
    """`KV_APPEND`, the cache kept being the append itself."""
    m = match(KV_APPEND, node)
    return KVAppend(node, m["past"], m["new"], stored=node) if m else None


def window_slice(node) -> int | None:
    """`kv[:, :, -keep:]` (a sliding-window layer keeping its last `keep`
    tokens, as DynamicSlidingWindowLayer does): keep, else None."""
    if not is_call(node, operator.getitem) or not isinstance(node.args[1], tuple):
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


def _static_cache_write(node):
    """`past.index_copy_(2, pos, new)` or index_put_: a StaticCache write."""
    return is_call(node, "index_copy_", "index_put_", torch.Tensor.index_copy_,
                    torch.ops.aten.index_copy_.default)


def _attach_kv(site: AttentionSite, key, value):
    """K/V through `KV` from KV-appends whose caches are only appended to
    and stored back: the site is rewritable, else its reason says why not."""
    site.reads = (key, value)
    k, v = match(KV, key), match(KV, value)
    site.chain += k.nodes + v.nodes
    site.key, site.value = kv_append(k["kv"]), kv_append(v["kv"])
    reason = _from_appends(site, k["kv"], v["kv"])
    for append in (site.key, site.value):
        reason = reason or _nested(append) or _only_appended(site, append) or _stored_back(site, append)
    site.reason = reason or _consistent(site)
    if site.reason:
        return
    site.rewritable = True
    site.reason = (f"{site.form} over {'compressed cache + new tokens' if site.key.compressed else 'a new block'}"
                   f"{' via repeat_kv' if site.chain and site.form == 'sdpa' else ''}"
                   f"{f', sliding window keeping {site.key.keep} tokens' if site.key.keep else ''}"
                   f"{f', scores soft-capped at {site.softcap:g}' if site.softcap else ''}"
                   f"{', sink logits' if site.sink_logits is not None else ''}"
                   f"{_unlike_head_dims(site)}")


def _unlike_head_dims(site: AttentionSite) -> str:
    dk, dv = head_dims(site)
    if None in (dk, dv) or dk == dv:
        return ""
    return f", V's head dim {dv} unlike K's {dk}" + (
        ": attended by the torch reference, which decompresses the store each step (the fused kernels "
        "take one head dim)" if site.key.compressed else "")


def _from_appends(site: AttentionSite, k_src, v_src) -> str | None:
    if site.key is not None and site.value is not None:
        return None
    src = k_src if site.key is None else v_src
    if _static_cache_write_feeding(src):
        return ("K/V come from a StaticCache (index_copy_ into a cache-owned buffer): "
                "that buffer is not a graph output, so it stays exact")
    return f"K/V do not come from a KV-append (found {src.name if isinstance(src, fx.Node) else src})"


def _nested(append: KVAppend) -> str | None:
    """The attended K/V are an append (the cache's past and new tokens)
    concatenated along the sequence with something else (DeepSeek V4: a
    sliding window's keys, then the compressor's long-range entries, cached
    apart): no one cache's append is what the attention reads."""
    if append is not None and kv_append(append.past) is not None:
        return (f"K/V are the cache's append {append.past.name} concatenated with {getattr(append.new, 'name', append.new)} "
                f"along the sequence (entries cached apart, e.g. DeepSeek V4's compressed long-range KV "
                f"after its sliding window): no single cache's append is attended; left exact")
    return None


def _only_appended(site: AttentionSite, append: KVAppend) -> str | None:
    """The cached past is read by nothing but its append (`past.numel() > 0`, Mllama, is a read)."""
    readers = [u for u in append.past.users
               if u is not append.node and not _sizes_for(u, site.chain) and not is_dead(u)]
    if readers:
        return f"the cached {append.past.name} is also read by {readers[0].name}, not only " \
               f"appended to; left exact"
    return None


def _stored_back(site: AttentionSite, append: KVAppend) -> str | None:
    """The append (or its sliding-window slice, then set as `append.stored`)
    is read by the attention alone and returned once, to be stored back."""
    users = [u for u in append.node.users if u.op != "output" and u not in site.chain
             and u is not site.output and not _sizes_for(u, site.chain)]
    if (other := other_layers_reader(append.node, users)) is not None:
        return (f"the appended cache {append.node.name} is also attended by another layer, "
                f"{module_of(other)} (KV shared across layers, as in Gemma 3n); left exact")
    if len(users) == 1 and (keep := window_slice(users[0])) is not None:
        append.stored, append.keep = users[0], keep
        users = [u for u in append.stored.users if u.op != "output"]
    outputs = [u for u in append.stored.users if u.op == "output"]
    if users:
        return (f"the appended cache {append.node.name} is also read by {users[0].name} "
                f"(e.g. a sliding-window slice); left exact")
    if len(outputs) != 1:
        return f"the appended cache {append.node.name} is not stored back into the cache"
    return None


def _consistent(site: AttentionSite) -> str | None:
    """K and V agree with each other and with q (their head dims may differ: `head_dims`)."""
    if site.key.compressed != site.value.compressed:
        return "K and V caches disagree (one compressed, one dense)"
    q, k = example_value(site.query), example_value(site.key.node)
    if q is not None and k is not None and q.shape[1] % k.shape[1]:
        return f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} KV heads"
    if site.key.keep != site.value.keep:
        return f"K and V keep different windows ({site.key.keep} and {site.value.keep} tokens)"
    return None


def head_dims(site: AttentionSite) -> tuple:
    """K's and V's head dims (they differ in MiMo, whose v_head_dim is its
    own), None where the graph does not say."""
    k, v = example_value(site.key.node), example_value(site.value.node)
    return (None if k is None else k.shape[-1]), (None if v is None else v.shape[-1])


def _sizes_for(node: fx.Node, chain: list) -> bool:
    """node is a size query (`x.size()`, `x.size(d)`, its items) read only
    by nodes of `chain` (e.g. repeat_kv's expand, with symbolic lengths):
    it goes away with them."""
    if not is_call(node, "size", operator.getitem) or \
            (is_call(node, operator.getitem) and not is_call(node.args[0], "size", operator.getitem)):
        return False
    return all(u in chain or _sizes_for(u, chain) for u in node.users)


def is_dead(node: fx.Node) -> bool:
    """Nothing in the graph needs node: it and every node reading it are pure
    and end unread (e.g. `past.numel()` whose value only fed a guard),
    so dead-code elimination drops them."""
    if node.op == "output" or node.is_impure():
        return False
    return all(is_dead(u) for u in node.users)


def recognised_sites(graph: fx.Graph) -> list[AttentionSite]:
    """The sites of the recognised attention forms in `graph`, in order,
    rewritable or with a reason (`passes.sites.find_sites` adds the rest)."""
    sites = []
    for node in graph.nodes:
        site = sdpa_site(node, len(sites)) or eager_site(node, len(sites)) or bmm_site(node, len(sites))
        if site is not None:
            sites.append(site)
    return sites


def _static_cache_write_feeding(node) -> bool:
    """node (or the tensor it slices) is written by index_copy_/index_put_."""
    while is_call(node, operator.getitem):
        node = node.args[0]
    return isinstance(node, fx.Node) and (
        _static_cache_write(node) or any(_static_cache_write(u) for u in node.users))


def other_layers_reader(node: fx.Node, users) -> fx.Node | None:
    """The first of `users` made outside `node`'s layer, its module and submodules
    (Gemma 3n's KV sharing: a later layer attends an earlier one's append), where
    both modules are known; else None."""
    layer = module_of(node)
    for user in users:
        path = module_of(user)
        if layer is not None and path is not None and path != layer and not path.startswith(layer + "."):
            return user
    return None


def module_of(node: fx.Node) -> str | None:
    """The path of the innermost module that made `node`, where Dynamo recorded it."""
    stack = node.meta.get("nn_module_stack") or {}
    return module_path(list(stack.values())[-1][0]) if stack else None
