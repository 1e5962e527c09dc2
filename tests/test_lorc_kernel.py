"""gear::lorc_attention_cpu (kernels/cpu_lorc_attention.h): LoRC's decode
attention with K rebuilt from its latents tile by tile, against the same
attention written out in torch (decompress the latents, times U^T, the
sinks' exact rows, RoPE, SDPA), for each instruction set this CPU has,
both RoPE forms, partial rotary, per-row positions and several codecs."""
import pytest
import torch

from gear_compile.kernels import cpu
from lorc_cases import case as _case
from lorc_cases import fused, reference

ISAS = ["scalar", "avx2", "avx512"]


def _isa_or_skip(name):
    cpu.load()
    try:
        cpu.isa(name)
    except RuntimeError:
        pytest.skip(f"this CPU has no {name}")


CASES = [
    ("none", 4, 1, 64),          # exact latents, rotate-half
    ("gear", 4, 1, 64),           # GEAR-4 latents (outliers, low rank)
    ("gear", 2, 2, 64),           # GEAR-2 (KIVI backbone), interleaved
    ("kivi", 2, 1, 32),           # partial rotary (half the head)
    ("gear", 4, 2, 16),           # interleaved, partial
    ("none", 4, 0, 0),           # no RoPE
    ("gear", 4, 1, 64, 0.1),      # K and V outliers
    ("gear", 2, 2, 32, 0.1),
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_fused_rebuild_matches_the_written_out_attention(isa, case):
    _isa_or_skip(isa)
    try:
        args = _case(*case[:4], outlier_ratio=case[4] if len(case) > 4 else None)
        if len(case) > 4:
            assert "p_out_val" in args[1].layout.names and "p_out_val" in args[2].layout.names
        out, ref = fused(*args), reference(*args)
        assert out.shape == args[0].shape
        err = (out - ref).abs().max().item()
        assert err < 2e-5, f"{isa} {case}: {err:.3g}"
    finally:
        cpu.isa("auto")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_latents(dtype):
    args = _case("gear", 4, 1, 64, dtype=dtype, seed=1)
    err = (fused(*args).float() - reference(*args)).abs().max().item()
    assert err < {torch.float16: 1e-2, torch.bfloat16: 4e-2}[dtype]


@pytest.mark.parametrize("T", [1, 3])
def test_long_past_many_splits_and_several_new_tokens(T):
    """Splits start mid-tile and mid-segment; several query tokens share a tile."""
    args = _case("gear", 4, 1, 64, prefill=700, appended=90, B=1, pad=(0,), T=T, seed=2)
    assert (fused(*args) - reference(*args)).abs().max().item() < 2e-5


def test_no_sinks_and_one_table_for_every_row():
    args = list(_case("gear", 4, 2, 64, s=0, pad=(0, 0), seed=3))
    args[9], args[10] = args[9][:1], args[10][:1]        # [1, 1, L, rd]: shared by the rows
    assert (fused(*args) - reference(*args)).abs().max().item() < 2e-5


@pytest.mark.parametrize("rotation, expected", [
    (lambda x: torch.cat([-x[..., 8:], x[..., :8]], -1), 1),
    (lambda x: torch.stack([-x[..., 1::2], x[..., 0::2]], -1).flatten(-2), 2),
    (lambda x: torch.cat([x[..., 8:], -x[..., :8]], -1), "neither rotate-half nor interleaved"),
    (lambda x: x.flip(-1), "neither rotate-half nor interleaved"),
], ids=["half", "interleaved", "negated", "flipped"])
def test_rope_forms_are_told_apart_by_probing(rotation, expected):
    """passes.lorc._form runs the graph's rotation on a probe: the two forms
    the kernel applies are recognised, anything else keeps the replay with
    the reason explain shows."""
    import torch.fx as fx
    from torch.fx.passes.shape_prop import ShapeProp

    from gear_compile.passes import lorc as lorc_pass

    def rope(k, cos, sin):
        return k * cos + rotation(k) * sin

    gm = fx.symbolic_trace(rope)
    example = (torch.randn(2, 3, 5, 16), torch.randn(2, 1, 5, 16), torch.randn(2, 1, 5, 16))
    ShapeProp(gm).propagate(*example)
    for node in gm.graph.nodes:
        if "tensor_meta" in node.meta:
            node.meta["example_value"] = torch.empty(node.meta["tensor_meta"].shape)
    k, cos, sin = (n for n in gm.graph.nodes if n.op == "placeholder")
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    first, second = out.args
    form = lorc_pass._form(k, second, cos, 16)
    if isinstance(expected, int):
        assert isinstance(form, lorc_pass.RopeForm) and form.mode == expected and form.rotary_dim == 16
        assert form.cos is cos and form.sin is sin
    else:
        assert isinstance(form, str) and expected in form
