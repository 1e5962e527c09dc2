"""`explain`: compile a model or function with the gear backend and return what
it did: each attention site (layer, form, phase, rewritten or fallback and
why) and each graph before/after as code, with a unified diff (readable by
default: one layer's rewrite in full, the layers with the same one named).

For a Hugging Face model, a prefill call and one decode step are run with a
fresh DynamicCache, so both the prefill graph (compress the block) and the
decode graph (append + attention over the compressed cache) are shown; the
model's forward is restored afterwards.
Neighbours: `backend` (does the work), `report` (GraphReport, collect), `cli`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import GearConfig
from .hf_compat import cache_kwarg
from .report import GraphReport, collect, write_diff


@dataclass
class Explanation:
    graphs: list[GraphReport]
    config: GearConfig

    @property
    def sites(self):
        return [s for g in self.graphs for s in g.sites]

    def text(self) -> str:
        return "\n".join(g.text() for g in self.graphs)

    def diff(self, full: bool = False) -> str:
        """Every graph's diff; abridged unless `full` (see GraphReport.diff)."""
        return "\n".join(g.diff(full) for g in self.graphs)

    def write(self, path: str) -> str:
        return write_diff(path, self.text(), self.diff())

    def __str__(self) -> str:
        return self.text()


def explain(model_or_fn, *example_inputs, **options) -> Explanation:
    """Run `model_or_fn` once compiled with backend="gear" and report.

    model_or_fn: a transformers model (then example_inputs = (input_ids,)) or
    any function (called with example_inputs). options: see GearConfig.
    """
    config = GearConfig.from_options(options)
    opts = config.as_options()
    torch._dynamo.reset()
    with collect() as reports, torch.no_grad():
        if hasattr(model_or_fn, "config") and hasattr(model_or_fn, "forward"):
            _run_model(model_or_fn, example_inputs, opts)
        else:
            torch.compile(model_or_fn, backend="gear", options=opts)(*example_inputs)
    torch._dynamo.reset()
    return Explanation(list(reports), config)


def _run_model(model, example_inputs, opts):
    from transformers import DynamicCache
    (input_ids,) = example_inputs
    original = model.forward
    model.forward = torch.compile(original, backend="gear", options=opts)
    try:
        cache = DynamicCache(config=model.config)
        out = model(input_ids=input_ids, **cache_kwarg(model, cache), use_cache=True)
        next_token = out.logits[:, -1:].argmax(-1)
        model(input_ids=next_token, **cache_kwarg(model, cache), use_cache=True)
    finally:
        model.forward = original
