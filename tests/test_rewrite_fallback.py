"""What the rewrite keeps, and what happens when its graph does not compile.

Specification: the rewrite's dead-code pass keeps every node that changes
state although nothing reads its result (`x[i] = y`, vmap's level pushes and
pops, in-place methods) and drops pure dead nodes; a prefill graph whose
rewrite does not compile runs as the model wrote it (the tokens of eager), and
its sites say why, instead of raising (Jamba's prefill raised from the gear
backend when vmap's pushes were dropped).
"""
import operator

import torch
import torch.fx as fx
from torch._functorch import predispatch

import gear_compile
import gear_compile.backend as backend
from gear_compile.models import tiny_model
from gear_compile.passes.rewrite import _mutates
from gear_compile.report import collect

from decoding import PROMPT


def _graph_with(target, *args):
    graph = fx.Graph()
    x = graph.placeholder("x")
    node = graph.call_function(target, (x, *args))
    graph.output(x)
    return node


def test_state_changes_survive_dead_code_elimination():
    assert _mutates(_graph_with(operator.setitem, 0, 1.0))
    assert _mutates(_graph_with(predispatch._vmap_increment_nesting, "error"))
    assert _mutates(_graph_with(predispatch._vmap_decrement_nesting))
    assert not _mutates(_graph_with(operator.getitem, 0))
    assert not _mutates(_graph_with(torch.sin))


def test_a_rewrite_that_does_not_compile_falls_back_exactly_and_says_why(monkeypatch):
    model = tiny_model("llama")
    with torch.no_grad():
        eager = model.generate(PROMPT, max_new_tokens=6, do_sample=False)
    lower = backend._lower

    def failing(gm, *args, **kwargs):
        if any("gear" in str(n.target) for n in gm.graph.nodes):
            raise RuntimeError("boom in lowering")
        return lower(gm, *args, **kwargs)
    monkeypatch.setattr(backend, "_lower", failing)
    gear_compile.compile(model, method="gear", bits=4, inductor=False)
    with torch.no_grad(), collect() as reports:
        out = model.generate(PROMPT, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, eager)
    sites = [s for g in reports for s in g.sites]
    assert sites and not any(s.rewritten for s in sites)
    assert all("does not compile (RuntimeError: boom in lowering)" in s.reason for s in sites), sites
