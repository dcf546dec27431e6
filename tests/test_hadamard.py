"""Exact Hadamard constructions (Sylvester, Paley I/II, Kronecker) and their reference application."""

import warnings

import pytest
import torch

from kernels_tl.hadamard import (apply_hadamard, block_hadamard_size, hadamard, hadamard_factors, hadamard_pm1,
                                 random_hadamard)


@pytest.mark.parametrize("n", [2, 4, 12, 20, 28, 36, 44, 76, 108, 140, 148, 192, 576])
def test_small_orders_are_exact_hadamard_matrices(n):
    h = hadamard_pm1(n)
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("n,factors", [(14336, [28, 512]), (1536, [12, 128]), (18944, [148, 128]),
                                       (29568, [924, 32]), (5632, [44, 128]), (4864, [76, 64]),
                                       (13824, [108, 128]), (8960, [140, 64]), (576, [36, 16]),
                                       (4096, [4096]), (3584, [28, 128])])
def test_model_sizes_factor_into_a_small_factor_times_a_power_of_two(n, factors):
    assert hadamard_factors(n) == factors


@pytest.mark.parametrize("n", [11008, 9, 172, 13696])
def test_sizes_without_a_known_online_hadamard(n):
    assert hadamard_factors(n) is None


@pytest.mark.parametrize("n", [9, 172, 344])
def test_unknown_orders_raise(n):
    with pytest.raises(ValueError, match="no Hadamard matrix"):
        hadamard_pm1(n)


def test_large_factor_allowed_offline_only():
    # 11008 = 2 * 5504 with 5503 prime ≡ 3 mod 4: exact, but too large a factor for an online kernel.
    assert hadamard_factors(11008, max_factor=None) == [5504, 2]
    assert block_hadamard_size(11008) == 256


@pytest.mark.parametrize("n", [1536, 14336, 18944])
def test_apply_is_orthogonal_for_large_orders(n):
    factors = hadamard_factors(n)
    x = torch.randn(8, n, dtype=torch.float64)
    y = apply_hadamard(x, factors)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-9)
    assert torch.allclose(apply_hadamard(y, factors, transpose=True), x, atol=1e-9)
    assert not torch.allclose(y, x)


@pytest.mark.parametrize("n", [96, 576, 1536])
def test_apply_matches_the_dense_matrix(n):
    x = torch.randn(5, n, dtype=torch.float64)
    assert torch.allclose(apply_hadamard(x, hadamard_factors(n)), x @ hadamard(n), atol=1e-10)


def test_block_diagonal_fallback():
    x = torch.randn(3, 4 * 12, dtype=torch.float64)
    y = apply_hadamard(x, [12], block=12)
    expected = torch.cat([x[:, i * 12:(i + 1) * 12] @ hadamard(12) for i in range(4)], dim=1)
    assert torch.allclose(y, expected, atol=1e-12)


def test_random_hadamard_is_orthogonal_and_seeded():
    a, b, c = random_hadamard(576, 1), random_hadamard(576, 1), random_hadamard(576, 2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.allclose(a @ a.T, torch.eye(576, dtype=torch.float64), atol=1e-10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = random_hadamard(344, 0)   # 344 = 8·43: no construction known here
    assert torch.allclose(q @ q.T, torch.eye(q.shape[0], dtype=torch.float64), atol=1e-10)
    assert any("random orthogonal" in str(w.message) for w in caught)
