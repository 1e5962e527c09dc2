"""Rewrite matched attention sites into `gear` ops on a copy of the graph.

For each rewritable site (see `passes.match`):

  prefill (past is dense, e.g. empty):  attention stays exact on the dense K/V;
      parts = gear.kv_prefill(cat) compresses the block, and the graph returns
      parts where it returned the cat (the runtime wraps them in a CompressedKV).
  decode (past is a CompressedKV):  the past placeholder is replaced by one
      placeholder per inner tensor (`StoreLayout.names`), attention becomes a
      gear attention op over the store plus the new tokens, and the cat
      disappears. With one new token (the per-token graph) the graph then
      writes it into the store's buffer and bumps the device lengths
      (`buffer_write`): no host work, no branch. With several, the graph
      returns the new tokens and the runtime appends them.
  LoRC (`passes.lorc`): prefill stores each K/V's latent instead of the
      K/V, and its first tokens exactly (the store's sinks); decode rebuilds
      the past K from its latents in front of its cat, attends V's latents
      and up-projects the output (or, where attention is not plain, rebuilds
      V too and leaves the attention as it is), then writes the new tokens'
      latents.
  rebuild (a cache read by what no form fuses, `sites.rebuild_sites`): the
      past is decompressed in front of its append each step; an MLA
      layer's attention then reads the latent itself (`passes.mla`).
  sliding window (the cache keeps cat[:, :, -keep:]): prefill compresses
      the kept tokens into n_b blocks (streamed: no prefill block); decode
      attends the whole store, whose tokens older than the layer's mask are
      hidden (the mask is aligned to the newest key), and the runtime drops
      whole blocks once they leave the window.
  rotated K / V (option `rotate`, `rotation`): prefill compresses cat R;
      decode attends q R and the new K R over the rotated store, the new V R,
      and multiplies the output by R^T.

The result says how to flatten inputs and rebuild outputs at run time
(`RewritePlan`). Neighbours: `passes.match` (sites), `ops` (what is emitted),
`runtime` (runs the plan).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..codec import resolve
from ..config import GearConfig
from ..ops import attention_for
from ..rotation import rotation
from ..store import StoreLayout
from . import lorc as lorc_pass
from . import lorc_fused
from . import mla as mla_pass
from .match import AttentionSite, head_dims
from .pattern import example_value


@dataclass(frozen=True)
class TensorOut:
    """A graph output passed through as it is."""


@dataclass(frozen=True)
class PrefillOut:
    """A new store: the next `parts` graph outputs are its inner tensors.
    keep: a sliding-window layer's window (tokens a future query may see),
    None for full attention. logical: the (heads, head_dim) a LoRC latent
    store stands for (`KVStore.logical`); dtype: the dense K/V's."""

    kind: str
    parts: int
    dtype: torch.dtype
    keep: int | None = None
    logical: tuple[int, int] | None = None


@dataclass(frozen=True)
class DecodeOut:
    """The store of Dynamo input `input`, updated by this call. `written`
    tokens were written into its buffer by the graph; 0: the next graph
    output holds the new tokens, which the runtime appends."""

    input: int
    written: int
    keep: int | None = None


@dataclass(frozen=True)
class Flattened:
    """A CompressedKV input passed as its `parts` inner tensors, then its
    size along each of `sizes`: a size symbol that only the CompressedKV's
    shape bound (a sliding-window cache's length, which the layer's mask is
    sized by) needs an input of its own once the CompressedKV is gone, or
    the compiled code reads a symbol it never binds."""

    parts: int
    sizes: tuple[int, ...] = ()


@dataclass
class RewritePlan:
    """How the compiled graph's calling convention differs from Dynamo's.

    inputs[i]: None (passed as is) or, for a CompressedKV input, the dims
    of its shape passed after its inner tensors (`Flattened`). outputs[j]:
    what the j-th output Dynamo expects is made of.
    """

    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)

    def flatten_inputs(self, args) -> list:
        flat = []
        for arg, spec in zip(args, self.inputs):
            if spec is None:
                flat.append(arg)
                continue
            flat += arg.store.tensors()
            for dim in spec.sizes:
                flat.append(arg.shape[dim])
        return flat

    def compile_inputs(self, gm: fx.GraphModule, args) -> list:
        """flatten_inputs for compiling `gm`: a size input goes in as the
        SymInt its placeholder holds, not as the example's int. AOT autograd
        gives every int input a fresh symbol, so an int would leave the
        symbol the graph's shapes are written in unbound."""
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        return [example_value(ph) if isinstance(x, int) and isinstance(example_value(ph), torch.SymInt) else x
                for ph, x in zip(placeholders, self.flatten_inputs(args), strict=True)]


def copy_graph(gm: fx.GraphModule) -> fx.Graph:
    """A copy of gm's graph that keeps Dynamo's per-placeholder source."""
    graph = fx.Graph()
    mapping = {}
    graph.output(graph.graph_copy(gm.graph, mapping))
    for old, new in mapping.items():
        if old.op == "placeholder":
            new._dynamo_source = getattr(old, "_dynamo_source", None)
    return graph


class _Rewriter:
    """The state of one rewrite: the graph copy and what replaced what."""

    def __init__(self, gm: fx.GraphModule, config: GearConfig, mla_forms: dict | None = None):
        self.gm = gm
        self.mla_forms = mla_forms or {}
        self.graph = copy_graph(gm)
        self.config = config
        self.by_name = {n.name: n for n in self.graph.nodes}
        self.placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        self.flattened: dict[fx.Node, list[fx.Node]] = {}
        self.size_dims: dict[fx.Node, tuple[int, ...]] = {}     # flattened -> dims passed as sizes
        self.bound = _bound_symbols(self.placeholders)
        self.replaced: dict[fx.Node, object] = {}     # cat node -> its output spec

    def node(self, original):
        return self.by_name[original.name] if isinstance(original, fx.Node) else original

    def inner_placeholders(self, ph: fx.Node) -> list[fx.Node]:
        """One placeholder per inner tensor of the CompressedKV input `ph`."""
        if ph not in self.flattened:
            store = example_value(ph).store
            nodes, anchor = [], ph
            for name, tensor in zip(store.tensor_names(), store.tensors()):
                with self.graph.inserting_after(anchor):
                    node = self.graph.placeholder(f"{ph.name}_{name}")
                node.meta["example_value"] = tensor
                node._dynamo_source = _attr_source(ph, name)
                nodes.append(node)
                anchor = node
            self.flattened[ph] = nodes
            self.size_dims[ph] = self.bind_sizes(ph, anchor)
        return self.flattened[ph]

    def bind_sizes(self, ph: fx.Node, anchor: fx.Node) -> tuple[int, ...]:
        """SymInt placeholders, after `anchor`, for the size symbols of the
        CompressedKV input `ph` that no other input binds; their dims."""
        dims = []
        for dim, size in enumerate(example_value(ph).shape):
            symbol = _plain_symbol(size)
            if symbol is None or symbol in self.bound:
                continue
            with self.graph.inserting_after(anchor):
                anchor = self.graph.placeholder(f"{ph.name}_size{dim}")
            # a SymInt whose own expression is the symbol: Inductor binds an input by that
            # (not by what the shape env's replacements make of it)
            anchor.meta["example_value"] = size.node.shape_env.create_symintnode(symbol, hint=size.node.hint)
            anchor._dynamo_source = None
            self.bound.add(symbol)
            dims.append(dim)
        return tuple(dims)

    def constant(self, tensor: torch.Tensor) -> fx.Node:
        """A get_attr node for `tensor`, kept on the module as `_gear_const_<i>`."""
        name = f"_gear_const_{sum(1 for n in self.graph.nodes if n.op == 'get_attr')}"
        setattr(self.gm, name, tensor)
        return self.graph.get_attr(name)

    def rotated(self, node: fx.Node, value: torch.Tensor, inverse: bool = False) -> fx.Node:
        """node R (or node R^T) for `value`'s head dim, dtype and device."""
        r = rotation(value.shape[-1], value.dtype, value.device, inverse)
        out = self.graph.call_function(torch.matmul, (node, self.constant(r)))
        out.meta["example_value"] = value
        return out

    def size(self, value):
        """A node (or int) for the size `value`: a SymInt placeholder of the graph."""
        if isinstance(value, torch.SymInt) and value.node.maybe_as_int() is not None:
            value = value.node.maybe_as_int()        # a window's length: a constant once the window is full
        if isinstance(value, int):
            return value
        for ph in self.placeholders:
            if isinstance(example_value(ph), torch.SymInt) and str(example_value(ph)) == str(value):
                return self.node(ph)
        raise LookupError(f"no placeholder holds the size {value}")

    def lorc_prefill(self, site: AttentionSite, lo: lorc_pass.LoRCSite) -> None:
        for append, proj, kind in ((site.key, lo.key, "k"), (site.value, lo.value, "v")):
            stored = self.node(append.stored)
            with self.graph.inserting_before(stored.next):     # in order, after the cat
                pre = self.node(proj.pre)
                x = lorc_pass.latent(self.graph, pre, self.constant(proj.factors.down))
                parts = self.graph.call_function(torch.ops.gear.kv_prefill.default,
                                                 (x, self.config.codec.to_json(), kind, False))
                dtype = example_value(proj.pre).dtype
                n = self.prefill_outputs(kind, proj.rank, dtype, example_value(proj.pre).shape[2], False)
                outputs = [self.graph.call_function(operator.getitem, (parts, i)) for i in range(n)]
                outputs.append(lorc_pass.sinks(self.graph, pre, self.config))
            self.replaced[stored] = (PrefillOut(kind, n + 1, dtype, None, (lo.heads, lo.head_dim)), outputs)

    def lorc_decode(self, site: AttentionSite, lo: lorc_pass.LoRCSite) -> None:
        tokens = example_value(site.key.new).shape[2]
        written = _written(tokens)
        length = self.size(example_value(site.key.past).shape[2])
        fold = lorc_pass.folds_values(site, tokens)
        if lorc_fused.choose_fused(site, lo, self.config, tokens):     # K rebuilt inside the kernel
            return lorc_fused.emit_fused(self, site, lo, length, written)
        for append, proj, kind in ((site.key, lo.key, "k"), (site.value, lo.value, "v")):
            past, cat = self.node(append.past), self.node(append.node)
            parts = self.inner_placeholders(past)
            if kind == "v" and fold:
                out = self.node(site.output)
                with self.graph.inserting_before(out):
                    new = lorc_pass.latent(self.graph, self.node(proj.pre), self.constant(proj.factors.down))
                    up_heads = lorc_pass.up_projection(proj.factors.up, lo, example_value(site.query).shape[1])
                    attn = lorc_pass.attend_latent_values(
                        self.graph, site, lo, self.node(site.query), self.node(site.key.node),
                        self.node(site.mask), parts, new, self.config, length,
                        self.constant(proj.factors.up), self.constant(up_heads))
                    if written:
                        self.write_latent(proj, kind, parts, new)
                out.replace_all_uses_with(attn)
            else:
                with self.graph.inserting_before(cat):
                    rebuilt = lorc_pass.rebuild_past(self.graph, lo, parts, self.config, kind, length,
                                                     self.constant(proj.factors.up), self.node(append.new),
                                                     self.node(proj.pre), self.node(proj.positions))
                    new = lorc_pass.latent(self.graph, self.node(proj.pre), self.constant(proj.factors.down))
                cat.replace_input_with(past, rebuilt)
                with self.graph.inserting_before(cat.next):
                    if written:
                        self.write_latent(proj, kind, parts, new)
            self.replaced[self.node(append.stored)] = (
                DecodeOut(self.placeholders.index(past), written), None if written else new)

    def write_latent(self, proj, kind: str, parts: list, new: fx.Node) -> None:
        dtype = example_value(proj.pre).dtype
        buffer_write(self.graph, StoreLayout.build(self.config, kind, proj.rank, dtype, 0), parts, new, dtype)

    def decode(self, site: AttentionSite) -> None:
        out = self.node(site.output)
        k_past, v_past = self.node(site.key.past), self.node(site.value.past)
        k_parts, v_parts = self.inner_placeholders(k_past), self.inner_placeholders(v_past)
        k_new, v_new = self.node(site.key.new), self.node(site.value.new)
        q_val = example_value(site.query)
        scale = site.scale if site.scale is not None else q_val.shape[-1] ** -0.5
        tokens = example_value(site.key.new).shape[2]
        tokens = tokens if isinstance(tokens, int) else -1          # symbolic: several
        dk, dv = head_dims(site)
        op = attention_for(q_val.device, self.config, tokens, one_head_dim=None in (dk, dv) or dk == dv)
        k_store, v_store = example_value(site.key.past).store, example_value(site.value.past).store
        rot_k, rot_v = self.config.rotates("k"), self.config.rotates("v")
        want = example_value(site.output)
        with self.graph.inserting_before(out):
            q = self.node(site.query)
            if rot_k:
                q, k_new = self.rotated(q, q_val), self.rotated(k_new, example_value(site.key.new))
            if rot_v:
                v_new = self.rotated(v_new, example_value(site.value.new))
            attn = self.graph.call_function(op.op, op.args(
                q, k_parts, v_parts, k_new, v_new, self.node(site.mask),
                scale, site.is_causal, self.config, k_store.layout, v_store.layout, site.softcap,
                self.node(site.sink_logits)))
            attn.meta["example_value"] = q_val.new_empty(want.shape)
            if tokens == 1:
                for parts, store, new in ((k_parts, k_store, k_new), (v_parts, v_store, v_new)):
                    buffer_write(self.graph, store.layout, parts, new, example_value(new).dtype)
            if rot_v:
                attn = self.rotated(attn, attn.meta["example_value"], inverse=True)
            if want.dtype != q_val.dtype:        # q upcast for fp32 attention: the output is cast back
                attn = self.graph.call_method("to", (attn, want.dtype))
            attn.meta["example_value"] = want
        out.replace_all_uses_with(attn)
        written = _written(tokens)
        for append, past, new in ((site.key, k_past, k_new), (site.value, v_past, v_new)):
            self.replaced[self.node(append.stored)] = (
                DecodeOut(self.placeholders.index(past), written, append.keep), None if written else new)

    def rebuild_decode(self, site: AttentionSite) -> None:
        """A "rebuild" site (`sites.rebuild_sites`): each past rebuilt densely
        (`gear::decompress`) in front of its append (or of a size query read
        before it), which the model reads as before; one new token is then
        written into the store's buffer. An MLA layer's attention then reads
        the latent itself (`passes.mla`), not its per-head up-projection."""
        written = _written(example_value(site.key.new).shape[2])
        for append, kind in ((site.key, "k"), (site.value, "v")):
            past, cat, new = self.node(append.past), self.node(append.node), self.node(append.new)
            parts, store = self.inner_placeholders(past), example_value(append.past).store
            first = next(n for n in self.graph.nodes if n in past.users)    # the append, or a size query
            with self.graph.inserting_before(first):
                rebuilt = self.graph.call_function(torch.ops.gear.decompress.default, (
                    parts, self.config.codec.to_json(), kind, self.size(example_value(append.past).shape[2]),
                    example_value(append.new).dtype))
            rebuilt.meta["example_value"] = example_value(append.past)
            past.replace_all_uses_with(rebuilt)
            if written:
                with self.graph.inserting_before(cat.next):       # in order, after the append
                    buffer_write(self.graph, store.layout, parts, new, example_value(append.new).dtype)
            self.replaced[self.node(append.stored)] = (
                DecodeOut(self.placeholders.index(past), written, append.keep), None if written else new)
        if site.index in self.mla_forms:
            mla_pass.absorb(self.graph, self.mla_forms[site.index], self.node,
                            self.node(site.key.node), self.node(site.value.node))

    def prefill(self, site: AttentionSite) -> None:
        for append, kind in ((site.key, "k"), (site.value, "v")):
            stored, windowed = self.node(append.stored), append.keep is not None
            x = example_value(append.stored)
            with self.graph.inserting_before(stored.next):
                kept = self.rotated(stored, x) if self.config.rotates(kind) else stored
                parts = self.graph.call_function(torch.ops.gear.kv_prefill.default,
                                                 (kept, self.config.codec.to_json(), kind, windowed))
            n = self.prefill_outputs(kind, x.shape[-1], x.dtype, x.shape[2], windowed)
            self.replaced[stored] = (PrefillOut(kind, n, x.dtype, append.keep), parts)

    def prefill_outputs(self, kind: str, head_dim: int, dtype: torch.dtype, prompt_tokens: int,
                        streamed: bool) -> int:
        """How many tensors `gear::kv_prefill` returns for this prompt: its
        store layout's, whose prefill block `Codec.split` sizes."""
        codec = resolve(self.config, head_dim)
        prefill = codec.split(int(prompt_tokens), streamed).prefill
        return len(StoreLayout.build(codec, kind, head_dim, dtype, prefill).names)

    def finish(self, gm: fx.GraphModule) -> tuple[fx.GraphModule, RewritePlan]:
        graph, plan = self.graph, RewritePlan()
        output = next(n for n in graph.nodes if n.op == "output")
        new_outputs = []
        for value in output.args[0]:
            spec, extra = self.replaced.get(value, (TensorOut(), value))
            plan.outputs.append(spec)
            if isinstance(spec, PrefillOut) and isinstance(extra, list):    # the nodes themselves
                new_outputs += extra
            elif isinstance(spec, PrefillOut):
                with graph.inserting_before(output):
                    new_outputs += [graph.call_function(operator.getitem, (extra, i))
                                    for i in range(spec.parts)]
            elif extra is not None:
                new_outputs.append(extra)
        output.args = (tuple(new_outputs),)
        graph.eliminate_dead_code(is_impure_node=_mutates)
        for ph in self.flattened:
            if ph.users:
                raise RuntimeError(f"gear rewrite: {ph.name} still has users {list(ph.users)} after rewriting")
            graph.erase_node(ph)
        plan.inputs = [Flattened(len(self.flattened[ph]), self.size_dims[ph]) if ph in self.flattened
                       else None for ph in self.placeholders]
        graph.lint()
        return fx.GraphModule(gm, graph), plan


def rewrite(gm: fx.GraphModule, sites: list[AttentionSite], config: GearConfig, lorc_sites=None,
            mla_forms=None):
    """Returns (new GraphModule, RewritePlan). `sites` were found on gm.graph;
    lorc_sites maps those that take LoRC to their `passes.lorc.LoRCSite`,
    mla_forms the MLA rebuild sites to their `passes.mla.MLAForm`."""
    rewriter = _Rewriter(gm, config, mla_forms)
    lorc_sites = lorc_sites or {}
    for site in (s for s in sites if s.rewritable):
        if site.index in lorc_sites:
            lo = lorc_sites[site.index]
            rewriter.lorc_decode(site, lo) if site.key.compressed else rewriter.lorc_prefill(site, lo)
        elif site.form == "rebuild" and site.key.compressed:
            rewriter.rebuild_decode(site)
        elif site.key.compressed:
            rewriter.decode(site)
        else:
            rewriter.prefill(site)
    return rewriter.finish(gm)


def buffer_write(graph: fx.Graph, layout: StoreLayout, parts: list, new: fx.Node,
                 dtype: torch.dtype) -> None:
    """Emit the per-token write of `new` [B, H, 1, D] (of `dtype`) into the
    buffer of the store `parts` at its live length, and the length's bump: an
    indexed write on the device, as a static cache does (no host read, no
    branch). The buffer may hold a narrower dtype (`CodecConfig.held_dtype`):
    the token is cast on the way in."""
    aten = torch.ops.aten
    lengths, buffer = parts[layout.names.index("lengths")], parts[layout.names.index("buffer")]
    if dtype != layout.dtype:
        new = graph.call_function(aten._to_copy.default, (new,), {"dtype": layout.dtype})
    position = graph.call_function(aten.slice.Tensor, (lengths, 0, 2, 3))
    graph.call_function(aten.index_copy_.default, (buffer, 2, position, new))
    graph.call_function(aten.add_.Scalar, (graph.call_function(aten.slice.Tensor, (lengths, 0, 2, 3)), 1))


def _mutates(node: fx.Node) -> bool:
    """Kept by dead-code elimination although nothing reads its result: what
    fx calls impure, and in-place tensor methods and functions (`x.copy_(y)`,
    which fx does not: e.g. the copy back of a tensor-parallel all-reduce's
    result into its input, whose loss changed every rank's activations)."""
    if node.is_impure():
        return True
    if node.op == "call_function" and "nesting" in getattr(node.target, "__name__", "") and \
            "functorch" in getattr(node.target, "__module__", ""):
        return True              # vmap's level pushes and pops (the mask functions'): a stack, kept whole
    if node.op == "call_function" and getattr(node.target, "__module__", None) == "_operator":
        # x[i] = y writes into x (Jamba's Mamba layer); operator.not_, and_, or_: pure,
        # whatever their names say
        return node.target in (operator.setitem, operator.delitem)
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return node.op in ("call_method", "call_function") and isinstance(name, str) \
        and name.endswith("_") and not name.endswith("__")


def _plain_symbol(size):
    """The sympy symbol a SymInt size is, or None (an int, or an expression)."""
    if isinstance(size, torch.SymInt) and size.node.expr.is_Symbol:
        return size.node.expr
    return None


def _bound_symbols(placeholders: list[fx.Node]) -> set:
    """The size symbols plain tensor inputs bind through their sizes and
    strides. Not a CompressedKV's (the rewrite replaces its placeholder), and
    not a SymInt input's: Dynamo may give one the symbol of another that its
    guards equate, and the compiled code binds the SymInt's own."""
    bound = set()
    for ph in placeholders:
        value = example_value(ph)
        if isinstance(value, torch.Tensor) and not hasattr(value, "store"):
            bound |= {s for s in map(_plain_symbol, [*value.shape, *value.stride()]) if s is not None}
    return bound


def _attr_source(ph: fx.Node, name: str):
    from torch._dynamo.source import AttrSource
    base = getattr(ph, "_dynamo_source", None)
    return AttrSource(base, name) if base is not None else None


def _written(tokens) -> int:
    """Tokens a decode graph writes into a store's buffer itself: a one-token
    step's; the new tokens of a longer call are returned for the runtime to
    append (`DecodeOut.written`)."""
    return 1 if tokens == 1 else 0
