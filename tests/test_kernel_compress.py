"""The Triton quantize+pack kernel (Triton interpreter on CPU) against the
torch codec: codes, scales and zero points must match `segment.compress` bit
for bit, for every backbone's K and V grouping."""
import pytest
import torch

from gear_compile.store import StoreLayout
from gear_compile.config import GearConfig
from gear_compile.kernels.compress import quantize_pack
from gear_compile.segment import compress


def _compare(x, layout):
    seg = compress(x, layout)
    spec = layout.spec
    group = layout.token_group if spec.axis == "channel" else layout.channel_group
    codes, scale, zero = quantize_pack(x, spec.bits, spec.axis, group)
    assert torch.equal(codes, seg.codes)
    for ours, ref in ((scale, seg.scale), (zero, seg.zero)):
        assert ours.dtype == ref.dtype and ours.shape == ref.shape
        assert torch.equal(ours.isnan(), ref.isnan())
        assert torch.equal(ours.nan_to_num(), ref.nan_to_num())


@pytest.mark.parametrize("method", ["kcvt", "kivi", "per_token"])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("kind", ["k", "v"])
@pytest.mark.parametrize("D", [64, 96])
def test_matches_segment_compress(method, bits, kind, D):
    cfg = GearConfig(method=method, bits=bits, group_size=16 if D == 64 else 32)
    layout = StoreLayout.build(cfg, kind, D, torch.float16, 0).decode
    gen = torch.Generator().manual_seed(bits * 7 + D)
    x = (torch.randn(2, 2, 2 * layout.block, D, generator=gen) * 3).half()
    x[0, 0, : layout.block] = 1.5                       # constant groups: scale 0
    x[1, 1, 3, :5] = 60000.0                            # near the fp16 limit
    _compare(x, layout)


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # inf / inf, as in torch
def test_non_finite_group_gets_nan_scale():
    cfg = GearConfig(method="kcvt", bits=4)
    layout = StoreLayout.build(cfg, "v", 64, torch.float32, 0).decode
    x = torch.randn(1, 1, layout.block, 64)
    x[0, 0, 2, 7] = float("nan")
    x[0, 0, 5, 1] = float("inf")
    _compare(x, layout)
