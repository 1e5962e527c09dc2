"""Specification of `gear_compile.quantize`: asymmetric min/max quantization
with fp16 scale and zero point. Every element reconstructs within half a step
of the *stored* fp16 scale, in every input dtype; constant vectors reconstruct
exactly when fp16-representable; a vector holding NaN or inf reconstructs as NaN
and leaves the other vectors alone."""
import pytest
import torch

from gear_compile.quantize import dequantize, quantize

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def half_step_excess(x, bits, dim):
    """max(|rebuilt - x| - scale/2) over all elements, with the stored scale."""
    codes, scale, zero = quantize(x, bits, dim=dim)
    rebuilt = codes.float() * scale.float() + zero.float()
    # the only slack is fp32 rounding of the reconstruction itself
    slack = 4 * torch.finfo(torch.float32).eps * x.float().abs().amax(dim=dim, keepdim=True)
    return ((rebuilt - x.float()).abs() - scale.float() / 2 - slack).max().item()


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [-1, -2])
def test_every_element_is_within_half_a_stored_step(bits, dtype, dim):
    x = (torch.randn(4, 6, 64) * 3 + 1).to(dtype)
    excess = half_step_excess(x, bits, dim)
    assert excess <= 0, f"bits={bits} dtype={dtype} dim={dim} shape={tuple(x.shape)}: excess {excess:g}"


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_half_step_bound_holds_for_heavy_tailed_and_offset_data(bits):
    x = torch.distributions.StudentT(2.0).sample((8, 128)) * 50 + 1000
    assert half_step_excess(x, bits, -1) <= 0


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_codes_fit_in_bits_and_parts_have_their_dtypes_and_shapes(bits):
    x = torch.randn(3, 5, 16)
    codes, scale, zero = quantize(x, bits, dim=-1)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape and int(codes.max()) < 2 ** bits
    assert scale.dtype == zero.dtype == torch.float16
    assert scale.shape == zero.shape == (3, 5, 1)


def test_a_scale_floor_widens_only_the_vectors_below_it_and_keeps_the_half_step_bound():
    x = torch.randn(6, 32)
    floor = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0])[:, None]
    codes, scale, zero = quantize(x, 4, dim=-1, min_scale=floor)
    plain = quantize(x, 4, dim=-1)[1]
    assert torch.equal(scale[:3], plain[:3]) and (scale[3:].float() >= 1.0).all()
    assert ((dequantize(codes, scale, zero) - x).abs() <= scale.float() / 2 + 1e-6).all()


def test_zero_point_is_never_above_the_minimum():
    x = torch.rand(64, 32) * 7 + 0.1
    _, _, zero = quantize(x, 4, dim=-1)
    assert (zero.float() <= x.amin(dim=-1, keepdim=True)).all()


@pytest.mark.parametrize("value", [0.0, 0.25, -2.5, 1024.0])
@pytest.mark.parametrize("dtype", DTYPES)
def test_constant_fp16_representable_vector_reconstructs_exactly_with_zero_scale(value, dtype):
    x = torch.full((3, 16), value, dtype=dtype)
    codes, scale, zero = quantize(x, 4, dim=-1)
    assert (scale == 0).all()
    assert torch.equal(dequantize(codes, scale, zero, dtype), x)


@pytest.mark.parametrize("value", [0.3, -0.7, 1e-3, 3.14159])
def test_constant_vector_between_fp16_values_reconstructs_within_its_fp16_gap(value):
    """The zero point is the fp16 value just below; the scale spans the gap, so
    the error is at most half a step of gap/15 (far below fp16 rounding)."""
    x = torch.full((2, 16), value)
    codes, scale, zero = quantize(x, 4, dim=-1)
    y = dequantize(codes, scale, zero)
    gap = value - zero.float()
    assert (gap >= 0).all()
    assert ((y - x).abs() <= scale.float() / 2 + 1e-12).all()
    assert (scale.float() <= gap / 15 * (1 + 2 ** -10) + 2 ** -24).all()
    assert (y == y[..., :1]).all(), "a constant vector reconstructs to a single value"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_vector_with_a_non_finite_value_reconstructs_as_nan_and_only_that_vector(bad):
    x = torch.randn(4, 16)
    x[2, 7] = bad
    codes, scale, zero = quantize(x, 4, dim=-1)
    y = dequantize(codes, scale, zero)
    assert torch.isnan(y[2]).all()
    assert torch.isfinite(y[[0, 1, 3]]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_returns_the_requested_dtype(dtype):
    codes, scale, zero = quantize(torch.randn(2, 8), 4, dim=-1)
    assert dequantize(codes, scale, zero, dtype).dtype == dtype


def test_more_bits_never_increase_the_error():
    x = torch.randn(16, 128)
    errors = []
    for bits in (2, 4, 8):
        codes, scale, zero = quantize(x, bits, dim=-1)
        errors.append((dequantize(codes, scale, zero) - x).abs().max().item())
    assert errors[0] > errors[1] > errors[2], f"max abs error at 2/4/8 bits: {errors}"
