"""The packed-mask format (DESIGN §2): numpy identity, round trips, padding checks."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lass_sparse
from lass_sparse.bitmask import (
    num_words,
    pack_mask_reference,
    padding_word_mask,
    popcount,
    unpack_mask_reference,
    validate_bits,
)

BACKENDS = [n for n in ("reference", "cpu") if lass_sparse.backends()[n]["active"]]


def numpy_pack(mask: np.ndarray) -> np.ndarray:
    """The format by definition: packbits little, padded to 4 bytes, viewed as LE int32."""
    n, k = mask.shape
    b = np.packbits(mask, axis=1, bitorder="little")
    b = np.pad(b, ((0, 0), (0, 4 * num_words(k) - b.shape[1])))
    return np.ascontiguousarray(b).view("<i4").reshape(n, num_words(k))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,k", [(1, 1), (3, 31), (2, 32), (5, 33), (4, 1000), (1, 64), (7, 95)])
def test_pack_matches_numpy_packbits(backend, n, k):
    mask = torch.rand(n, k) > 0.5
    with lass_sparse.use_backend(backend):
        bits = lass_sparse.pack_mask(mask)
    assert bits.dtype == torch.int32 and bits.shape == (n, num_words(k))
    np.testing.assert_array_equal(bits.numpy(), numpy_pack(mask.numpy()))


def test_bit_order_lsb_first():
    mask = torch.zeros(1, 40, dtype=torch.bool)
    mask[0, 0] = mask[0, 31] = mask[0, 33] = True
    bits = lass_sparse.pack_mask(mask)
    assert bits[0, 0].item() == (1 | -(2**31))  # bits 0 and 31 -> negative int32
    assert bits[0, 1].item() == 2


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=60, deadline=None)
@given(
    n=st.sampled_from([0, 1, 2, 5]),
    k=st.sampled_from([0, 1, 31, 32, 33, 63, 64, 65, 1000]),
    p=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_round_trip_fuzz(backend, n, k, p, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, k, generator=g) < p
    with lass_sparse.use_backend(backend):
        bits = lass_sparse.pack_mask(mask)
        assert bits.shape == (n, num_words(k))
        validate_bits(bits, k)
        assert torch.equal(lass_sparse.unpack_mask(bits, k), mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims(backend):
    mask = torch.rand(3, 4, 70) > 0.3
    with lass_sparse.use_backend(backend):
        bits = lass_sparse.pack_mask(mask)
        assert bits.shape == (3, 4, 3)
        assert torch.equal(lass_sparse.unpack_mask(bits, 70), mask)
    assert torch.equal(bits, pack_mask_reference(mask))


def test_validate_bits_rejects_padding_and_shapes():
    bits = pack_mask_reference(torch.ones(2, 33, dtype=torch.bool))
    validate_bits(bits, 33)
    bad = bits.clone()
    bad[1, 1] |= 1 << 5
    with pytest.raises(ValueError, match="nonzero padding bits"):
        validate_bits(bad, 33)
    with pytest.raises(ValueError, match="words per row"):
        validate_bits(bits, 65)
    with pytest.raises(ValueError, match="int32"):
        validate_bits(bits.long(), 33)
    assert padding_word_mask(32) == 0 and padding_word_mask(31) == -(2**31)


def test_pack_rejects_non_bool_and_unpack_wrong_words():
    with pytest.raises(TypeError, match="mask must be bool"):
        lass_sparse.pack_mask(torch.ones(2, 3))
    with pytest.raises(ValueError, match="ceil"):
        lass_sparse.unpack_mask(torch.zeros(2, 2, dtype=torch.int32), 70)


def test_popcount_counts_bits_without_unpacking():
    mask = torch.rand(6, 200) > 0.4
    bits = pack_mask_reference(mask)
    assert int(popcount(bits).sum()) == int(mask.sum())
    assert unpack_mask_reference(bits, 200).sum() == mask.sum()
