"""Rewrite matched attention sites into `gear` ops on a copy of the graph.

For each rewritable site (see `passes.match`):

  prefill (past is dense, e.g. empty):  attention stays exact on the dense K/V;
      parts = gear.kv_prefill(cat) compresses the block, and the graph returns
      parts where it returned the cat (the backend wraps them in a CompressedKV).
  decode (past is a CompressedKV):  the past placeholder is replaced by one
      placeholder per inner tensor; gear.kv_append_(parts, new) pushes the new
      tokens (flushing full blocks), attention becomes gear.attention (or the
      Triton decode op) over the parts, and the cat disappears.

The result says how to flatten inputs and rebuild outputs at run time
(`RewritePlan`). Neighbours: `passes.match` (sites), `backend` (runs the plan).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..compressed_kv import segment_layouts
from ..config import GearConfig
from ..ops import decode_attention_op
from .match import AttentionSite, _value


@dataclass
class RewritePlan:
    """How the compiled graph's calling convention differs from Dynamo's.

    inputs[i]: None (passed as is) or the number of inner tensors the i-th
    input (a CompressedKV) is flattened into.
    outputs[j]: ("tensor",), ("prefill", kind, n_parts) or ("decode", input_index).
    """

    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)

    def flatten_inputs(self, args) -> list:
        flat = []
        for arg, n in zip(args, self.inputs):
            if n is None:
                flat.append(arg)
            else:
                flat += arg.store.tensors()
        return flat


def copy_graph(gm: fx.GraphModule) -> fx.Graph:
    """A copy of gm's graph that keeps Dynamo's per-placeholder source."""
    graph = fx.Graph()
    mapping = {}
    graph.output(graph.graph_copy(gm.graph, mapping))
    for old, new in mapping.items():
        if old.op == "placeholder":
            new._dynamo_source = getattr(old, "_dynamo_source", None)
    return graph


def rewrite(gm: fx.GraphModule, sites: list[AttentionSite], config: GearConfig):
    """Returns (new GraphModule, RewritePlan). `sites` were found on gm.graph."""
    graph = copy_graph(gm)
    by_name = {n.name: n for n in graph.nodes}
    cfg = config.to_json()
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    flattened: dict[fx.Node, list[fx.Node]] = {}
    replaced_outputs: dict[fx.Node, tuple] = {}

    def inner_placeholders(ph: fx.Node) -> list[fx.Node]:
        if ph not in flattened:
            value = _value(ph)
            names = value.store.tensor_names()
            nodes, anchor = [], ph
            for name, tensor in zip(names, value.store.tensors()):
                with graph.inserting_after(anchor):
                    node = graph.placeholder(f"{ph.name}_{name}")
                node.meta["example_value"] = tensor
                node._dynamo_source = _attr_source(ph, name)
                nodes.append(node)
                anchor = node
            flattened[ph] = nodes
        return flattened[ph]

    for site in (s for s in sites if s.rewritable):
        out = by_name[site.output.name]
        k_cat, v_cat = by_name[site.key.node.name], by_name[site.value.node.name]
        if site.key.compressed:
            k_parts = inner_placeholders(by_name[site.key.past.name])
            v_parts = inner_placeholders(by_name[site.value.past.name])
            q = by_name[site.query.name]
            mask = by_name[site.mask.name] if isinstance(site.mask, fx.Node) else None
            q_val = _value(site.query)
            scale = site.scale if site.scale is not None else q_val.shape[-1] ** -0.5
            op = torch.ops.gear.attention.default
            if q_val.shape[2] == 1 and not site.is_causal:
                op = decode_attention_op(q_val.device, config)
            with graph.inserting_before(out):
                graph.call_function(torch.ops.gear.kv_append_.default,
                                    (k_parts, by_name[site.key.new.name], cfg, "k"))
                graph.call_function(torch.ops.gear.kv_append_.default,
                                    (v_parts, by_name[site.value.new.name], cfg, "v"))
                if op is torch.ops.gear.attention.default:
                    attn = graph.call_function(op, (q, k_parts, v_parts, mask, float(scale),
                                                    site.is_causal, cfg))
                else:
                    attn = graph.call_function(op, (q, k_parts, v_parts, mask, float(scale), cfg))
            attn.meta["example_value"] = _value(site.output)
            out.replace_all_uses_with(attn)
            input_index = placeholders.index(by_name[site.key.past.name])
            replaced_outputs[k_cat] = ("decode", input_index)
            replaced_outputs[v_cat] = ("decode", placeholders.index(by_name[site.value.past.name]))
        else:
            for cat, kind in ((k_cat, "k"), (v_cat, "v")):
                with graph.inserting_after(cat):
                    parts = graph.call_function(torch.ops.gear.kv_prefill.default, (cat, cfg, kind))
                replaced_outputs[cat] = ("prefill", kind, parts)

    plan = RewritePlan()
    output = next(n for n in graph.nodes if n.op == "output")
    new_outputs = []
    for value in output.args[0]:
        spec = replaced_outputs.get(value)
        if spec is None:
            new_outputs.append(value)
            plan.outputs.append(("tensor",))
        elif spec[0] == "decode":
            plan.outputs.append(spec)
        else:
            _, kind, parts = spec
            n_parts = _count_parts(parts, kind, config)
            with graph.inserting_before(output):
                new_outputs += [graph.call_function(operator.getitem, (parts, i)) for i in range(n_parts)]
            plan.outputs.append(("prefill", kind, n_parts))
    output.args = (tuple(new_outputs),)
    graph.eliminate_dead_code()
    for ph, inner in flattened.items():
        if ph.users:
            raise RuntimeError(f"gear rewrite: {ph.name} still has users {list(ph.users)} after rewriting")
        graph.erase_node(ph)
    plan.inputs = [len(flattened[ph]) if ph in flattened else None for ph in placeholders]
    graph.lint()
    return fx.GraphModule(gm, graph), plan


def _count_parts(parts_node: fx.Node, kind: str, config: GearConfig) -> int:
    """Number of tensors gear.kv_prefill returns for the block it compresses."""
    x = _value(parts_node.args[0])
    n_pre = config.prefill_tokens(int(x.shape[2]))
    p_layout, d_layout = segment_layouts(config, kind, x.shape[-1], x.dtype, n_pre)
    return 2 + len(p_layout.part_names()) + len(d_layout.part_names())


def _attr_source(ph: fx.Node, name: str):
    from torch._dynamo.source import AttrSource
    base = getattr(ph, "_dynamo_source", None)
    return AttrSource(AttrSource(base, "store"), name) if base is not None else None

