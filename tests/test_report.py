"""The graph diff a person reads (report, graph_diff) and the module paths sites report.

Specification: signatures are diffed one parameter a line, so a changed
parameter is one -/+ pair; when several layers get the same rewrite up to layer
indices and Dynamo's numbering, the readable diff shows the first in full and
one line naming the others, shows a layer that differs in full, counts blocks
repeating the block above them, and says at its top that it is abridged, while
the full diff keeps every line (it is difflib's unified diff); site layers are
the model's module paths, without Dynamo's `L['args'][0]` / `L['self']`.
"""
import difflib
import re

import torch

import gear_compile
from gear_compile.graph_diff import NOTE, full_diff, readable_diff, wrap_signatures
from gear_compile.hf_compat import cache_kwarg
from gear_compile.models import tiny_model
from gear_compile.passes.match import module_path

PARAMS = [f"p{i} : torch.Tensor" for i in range(40)]


def changed_lines(diff: str) -> list[str]:
    return [line for line in diff.splitlines() if line[:1] in "+-" and line[:3] not in ("---", "+++")]


def test_a_long_signature_is_wrapped_one_parameter_a_line():
    code = f"\n\ndef forward(self, {', '.join(PARAMS)}, size = (1, 2)) -> torch.Tensor:\n    return p0\n"
    lines = wrap_signatures(code).splitlines()
    start = lines.index("def forward(")
    assert lines[start + 1:start + 43] == ["    self,"] + [f"    {p}," for p in PARAMS] + ["    size = (1, 2),"]
    assert lines[start + 43:] == [") -> torch.Tensor:", "    return p0"]


def test_a_changed_parameter_is_one_minus_and_one_plus_line():
    before = f"def forward(self, {', '.join(PARAMS)}):\n    return p0\n"
    after = before.replace("p7 : torch.Tensor", "p7_codes, p7_scale")
    assert changed_lines(full_diff(before, after, "a", "b")) == [
        "-    p7 : torch.Tensor,", "+    p7_codes,", "+    p7_scale,"]


def layer(i: int, method: str, suffix: str, freed: str = "") -> tuple[list[str], list[str]]:
    """One layer's code before and after a synthetic rewrite, numbered the way
    Dynamo numbers names (layer 0 plain, later layers `_<n>`); `freed`: FX's
    note freeing values after their last use, on the replaced line."""
    n = f"_{i}" if i else ""
    w = f"l_self_modules_model_modules_layers_modules_{i}_modules"
    head = [f"    query{n} = torch._C._nn.linear(hidden{n}, {w}_q_proj_parameters_weight_, None)",
            f"    keys{n} = torch._C._nn.linear(hidden{n}, {w}_k_proj_parameters_weight_, None)",
            f"    values{n} = torch._C._nn.linear(hidden{n}, {w}_v_proj_parameters_weight_, None)"]
    tail = [f"    out{n} = torch._C._nn.linear(attn{n}, {w}_o_proj_parameters_weight_, None)"]
    tail += [f"    act{n}_{k} = out{n} * {k}" for k in range(6)]
    tail += [f"    hidden_{i + 1} = torch._C._nn.linear(act{n}_5, {w}_down_parameters_weight_, None)"]
    sdpa = [f"    attn{n} = torch._C._nn.scaled_dot_product_attention(query{n}, keys{n}, values{n}){freed}"]
    gear = [f"    kv_prefill{suffix} = torch.ops.gear.kv_prefill.default(keys{n}, values{n}, '{method}')",
            f"    attn{n} = torch.ops.gear.attention.default(query{n}, kv_prefill{suffix})"]
    return head + sdpa + tail, head + gear + tail


def synthetic_graph():
    """4 layers: 0, 1 and 3 rewritten alike (kcvt), layer 2 differently (kivi)."""
    layers = [layer(0, "kcvt", ""), layer(1, "kcvt", "_1"), layer(2, "kivi", "_2"),
              layer(3, "kcvt", "_3", freed=";  mask = None")]
    top = ["", "def forward(self, hidden):"]
    before = top + [line for b, _ in layers for line in b] + ["    return (hidden_4,)"]
    after = top + [line for _, a in layers for line in a] + ["    return (hidden_4,)"]
    return "\n".join(before) + "\n", "\n".join(after) + "\n"


def test_one_layer_in_full_the_matching_layers_named_a_different_layer_in_full():
    before, after = synthetic_graph()
    readable = readable_diff(before, after, "before.py", "after.py").splitlines()
    assert readable[0] == NOTE
    summary = readable.index("# layers 1, 3: the same rewrite as layer 0")
    shown = [line for line in readable if line.startswith("+    kv_prefill")]
    assert shown == ["+    kv_prefill = torch.ops.gear.kv_prefill.default(keys, values, 'kcvt')",
                     "+    kv_prefill_2 = torch.ops.gear.kv_prefill.default(keys_2, values_2, 'kivi')"]
    layer0 = readable.index(shown[0])
    layer2 = readable.index(shown[1])
    assert layer0 < summary < layer2
    assert not any("_1," in line or "_3," in line for line in changed_lines("\n".join(readable)))


def test_the_full_diff_has_every_line():
    before, after = synthetic_graph()
    full = full_diff(before, after, "before.py", "after.py")
    expected = difflib.unified_diff(wrap_signatures(before).splitlines(), wrap_signatures(after).splitlines(),
                                    "before.py", "after.py", lineterm="")
    assert full == "\n".join(expected) + "\n"
    assert len(re.findall(r"^\+    kv_prefill", full, re.M)) == 4 and NOTE not in full


def test_a_diff_with_no_repeated_layer_is_not_abridged():
    before, after = synthetic_graph()
    one_layer = before.split("    query_1 =")[0], after.split("    query_1 =")[0]
    assert readable_diff(*one_layer, "a", "b") == full_diff(*one_layer, "a", "b")


def test_blocks_repeating_the_block_above_are_counted():
    outputs = [f"    getitem_{3 * j + k} = kv_prefill_{j}[{k}]" for j in range(5) for k in range(3)]
    before = "def forward(self, x):\n    y = x + 1\n    return (y,)\n"
    after = "def forward(self, x):\n    y = x + 1\n" + "\n".join(outputs) + "\n    return (y,)\n"
    readable = readable_diff(before, after, "a", "b").splitlines()
    start = readable.index("+" + outputs[0])
    assert readable[start:start + 4] == ["+" + line for line in outputs[:3]] + [
        "# ... 4 more like the 3 line(s) above, up to numbering"]
    assert len(changed_lines(full_diff(before, after, "a", "b"))) == 15


def test_module_paths_drop_dynamos_name_for_the_model():
    assert module_path("L['args'][0].model.layers.0.self_attn") == "model.layers.0.self_attn"
    assert module_path("L['self'].model.layers.12.self_attn") == "model.layers.12.self_attn"
    assert module_path("L['self']") == "model"
    assert module_path("transformer.h.3.attn") == "transformer.h.3.attn"


def test_a_4_layer_llama_diff_shows_one_layer_and_names_the_others(tmp_path):
    ids = torch.randint(0, 256, (1, 11), generator=torch.Generator().manual_seed(1))
    model = tiny_model("llama", num_hidden_layers=4)
    kw = next(iter(cache_kwarg(model, None)))       # the cache keyword: `cache` (newer 5.x) or `past_key_values`
    report = gear_compile.explain(model, ids, method="gear", bits=4, inductor=False)
    prefill = report.graphs[0]
    assert "# layers 1-3: the same rewrite as layer 0" in prefill.diff()
    assert prefill.diff().count("torch.ops.gear.kv_prefill") == 2
    assert prefill.diff(full=True).count("torch.ops.gear.kv_prefill") == 8
    assert len(prefill.diff().splitlines()) < len(prefill.diff(full=True).splitlines()) / 3
    for graph in report.graphs:     # decode: layer 0 alone reads the cache's length, so 1-3 may differ from it
        assert len(graph.diff().splitlines()) < len(graph.diff(full=True).splitlines())
        assert re.search(r"^# layers? [0-9, -]+: the same rewrite as layer \d$", graph.diff(), re.M)
    decode = report.graphs[1].diff().splitlines()     # the cache's parameters change: one a line
    assert f"+    l_kwargs_{kw}_layers_0_keys_lengths," in decode
    assert any(line.startswith(f"-    L_kwargs_{kw}_layers_0_keys :") and line.endswith(",") for line in decode)
    assert [s.layer for s in report.sites] == [f"model.layers.{i}.self_attn" for i in range(4)] * 2
    assert "L[" not in report.text()
    path = report.write(str(tmp_path / "gear.diff"))
    lines = open(path).read().splitlines()
    assert lines[0] == NOTE and lines.count(NOTE) == 1
