"""Specification of `gear_compile.packing`: planar bit-packing of codes along the
channel dimension (byte j of a row holds channels j, j+W, j+2W, ... from the low
bits up), lossless for every supported width and any head dim."""
import pytest
import torch

from gear_compile import packing

ODD_AND_EVEN_DIMS = [1, 2, 3, 5, 8, 63, 64, 65, 127, 128]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("head_dim", ODD_AND_EVEN_DIMS)
def test_unpack_of_pack_returns_the_codes(bits, head_dim):
    codes = torch.randint(0, 2 ** bits, (2, 3, 5, head_dim), dtype=torch.uint8)
    assert torch.equal(packing.unpack(packing.pack(codes, bits), bits, head_dim), codes)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("head_dim", ODD_AND_EVEN_DIMS)
def test_packed_row_is_ceil_of_head_dim_times_bits_over_eight_bytes(bits, head_dim):
    codes = torch.zeros(4, head_dim, dtype=torch.uint8)
    packed = packing.pack(codes, bits)
    expected = -(-head_dim * bits // 8)
    assert packed.shape == (4, expected) and packed.dtype == torch.uint8
    assert packing.packed_width(head_dim, bits) == expected


@pytest.mark.parametrize("bits", [2, 4])
def test_extreme_codes_survive_packing(bits):
    top = 2 ** bits - 1
    codes = torch.tensor([[top] * 7 + [0] * 6], dtype=torch.uint8)
    assert torch.equal(packing.unpack(packing.pack(codes, bits), bits, 13), codes)


def test_two_bit_layout_is_planar():
    codes = torch.tensor([[0, 1, 2, 3, 3, 2, 1, 0]], dtype=torch.uint8)   # W = 2 bytes
    # byte 0 holds channels 0, 2, 4, 6 and byte 1 channels 1, 3, 5, 7, low bits first
    byte0 = 0 | 2 << 2 | 3 << 4 | 1 << 6
    byte1 = 1 | 3 << 2 | 2 << 4 | 0 << 6
    assert packing.pack(codes, 2).tolist() == [[byte0, byte1]]


def test_four_bit_layout_is_planar():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6]], dtype=torch.uint8)          # W = 3 bytes
    # byte j = channel j (low nibble) | channel j + 3 (high nibble)
    assert packing.pack(codes, 4).tolist() == [[1 | 4 << 4, 2 | 5 << 4, 3 | 6 << 4]]


def test_odd_head_dim_pads_the_last_field_with_zeros():
    codes = torch.tensor([[3, 3, 3]], dtype=torch.uint8)                 # 2 bits, W = 1
    assert packing.pack(codes, 2).tolist() == [[3 | 3 << 2 | 3 << 4]]


def test_eight_bit_codes_are_stored_as_they_are():
    codes = torch.randint(0, 256, (3, 7), dtype=torch.uint8)
    assert torch.equal(packing.pack(codes, 8), codes)


@pytest.mark.parametrize("bits", [1, 3, 16])
def test_unsupported_width_is_refused_by_name(bits):
    with pytest.raises(ValueError, match=r"bits must be one of \[2, 4, 8\]"):
        packing.pack(torch.zeros(1, 4, dtype=torch.uint8), bits)
