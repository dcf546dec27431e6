"""Exact Hadamard matrices of the orders LLMs need, and their reference application.

An order n is built as a Kronecker product of factors this module can construct exactly:
powers of two (Sylvester), q + 1 for a prime q ≡ 3 (mod 4) (Paley I) and 2(q + 1) for a prime
q ≡ 1 (mod 4) (Paley II). That covers 12, 20, 28, 36, 44, 76, 108, 140, 148, 924 ... times 2^k, so
14336 = 28·512 (Llama-3-8B), 18944 = 148·128 (Qwen-2.5-7B), 1536 = 12·128 (SmolLM2).
Orders with no known construction here (11008 = 172·64 needs a Williamson matrix) get None from
`hadamard_factors`; callers then choose a documented fallback (`block_hadamard_size`).
"""

from __future__ import annotations

import math
import warnings
from functools import lru_cache

import torch


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    return all(q % p for p in range(2, math.isqrt(q) + 1))


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _paley_kind(n: int) -> str | None:
    if _is_prime(n - 1) and (n - 1) % 4 == 3:
        return "paley1"
    if n % 2 == 0 and _is_prime(n // 2 - 1) and (n // 2 - 1) % 4 == 1:
        return "paley2"
    return None


# Non-power-of-two factors larger than this make an online transform cost more than the GEMM it
# feeds (a dense f x f product per f channels); offline rotations are free to use any order.
ONLINE_MAX_FACTOR = 1024


@lru_cache(maxsize=None)
def _base_factors(n: int, max_factor: int) -> tuple[int, ...] | None:
    """Factors of n: the smallest Paley order m (≤ max_factor) with n = m·2^k, then 2^k; else a
    product of two Paley orders times 2^k."""
    if _is_pow2(n):
        return (n,)
    if n % 4:
        return None
    best, m, p2 = None, n, 1
    while m % 4 == 0:
        if _paley_kind(m) and m <= max_factor:
            best = (m, p2) if p2 > 1 else (m,)
        m, p2 = m // 2, p2 * 2
    if best is not None:
        return best
    for a in range(12, min(n, max_factor) + 1, 4):
        if n % a == 0 and _paley_kind(a):
            rest = _base_factors(n // a, max_factor)
            if rest is not None and not _is_pow2(n // a):
                return (a,) + rest
    return None


def hadamard_factors(n: int, max_factor: int | None = ONLINE_MAX_FACTOR) -> list[int] | None:
    """Kronecker factors of an exact Hadamard of order n, or None when none is known here.

    max_factor bounds the non-power-of-two factor (None: any order, for offline rotations).
    """
    if n in (1, 2):
        return [n]
    f = _base_factors(n, max_factor or n)
    return None if f is None else list(f)


def has_hadamard(n: int, max_factor: int | None = ONLINE_MAX_FACTOR) -> bool:
    return hadamard_factors(n, max_factor) is not None


def _legendre(a: int, q: int) -> int:
    a %= q
    if a == 0:
        return 0
    return 1 if pow(a, (q - 1) // 2, q) == 1 else -1


def _jacobsthal(q: int) -> torch.Tensor:
    idx = torch.arange(q)
    chi = torch.tensor([_legendre(a, q) for a in range(q)], dtype=torch.float64)
    return chi[(idx.unsqueeze(0) - idx.unsqueeze(1)) % q]          # Q[i, j] = χ(j − i)


@lru_cache(maxsize=None)
def _factor_pm1(n: int) -> torch.Tensor:
    if _is_pow2(n):
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < n:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        return h
    kind = _paley_kind(n)
    if kind == "paley1":
        q = n - 1
        s = torch.zeros(n, n, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
        return torch.eye(n, dtype=torch.float64) + s
    if kind == "paley2":
        q = n // 2 - 1
        c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
        a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)
    raise ValueError(f"{n} is not a Sylvester or Paley order")


def hadamard_pm1(n: int) -> torch.Tensor:
    """The ±1 Hadamard matrix of order n (float64, H Hᵀ = n I)."""
    factors = hadamard_factors(n, max_factor=None)
    if factors is None:
        raise ValueError(f"no Hadamard matrix of order {n} is known to this project "
                         "(orders are 1, 2, or products of 2^k, Paley I and Paley II orders)")
    h = torch.ones(1, 1, dtype=torch.float64)
    for f in factors:
        h = torch.kron(h, _factor_pm1(f))
    return h


def hadamard(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Orthonormal Hadamard H / sqrt(n)."""
    return (hadamard_pm1(n) / math.sqrt(n)).to(dtype)


def random_hadamard(n: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """diag(random signs) @ H: orthogonal and seed-deterministic (QuaRot's randomized Hadamard).

    Orders with no known Hadamard fall back, with a warning, to a seeded random orthogonal matrix:
    offline rotations only need orthogonality.
    """
    g = torch.Generator().manual_seed(seed)
    if has_hadamard(n, max_factor=None):
        signs = torch.randint(0, 2, (n,), generator=g).double() * 2 - 1
        return (signs.unsqueeze(1) * hadamard(n)).to(dtype)
    warnings.warn(f"no Hadamard matrix of order {n} is known; using a random orthogonal matrix instead")
    qm, rm = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (qm * torch.sign(torch.diagonal(rm)).unsqueeze(0)).to(dtype)


def block_hadamard_size(n: int) -> int:
    """Largest b dividing n with an exact Hadamard: the block size of the block-diagonal fallback
    used for online transforms whose full order has no known construction (recorded in the
    checkpoint config, never silent)."""
    return max(b for b in range(1, n + 1) if n % b == 0 and has_hadamard(b))


@lru_cache(maxsize=None)
def _factor_matrix(f: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # Built once per device: a host-to-device copy per call would also break CUDA-graph capture.
    return (_factor_pm1(f) / math.sqrt(f)).to(device=device, dtype=dtype)


def apply_hadamard(x: torch.Tensor, factors: list[int], block: int | None = None,
                   transpose: bool = False) -> torch.Tensor:
    """y = x @ H (or x @ Hᵀ) along the last dim, H the orthonormal Kronecker product of `factors`.

    Computed as one small matmul per factor on a reshaped view, as a kernel would: O(n·Σf), not O(n²).
    With `block`, H is block-diagonal: each contiguous block of prod(factors) channels separately.
    Computes in float32 (float64 if x is float64) and returns x's dtype.
    """
    size = math.prod(factors)
    if block is not None and block != size:
        raise ValueError(f"block {block} does not match factors {factors}")
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    n = x.shape[-1]
    if n % size:
        raise ValueError(f"last dim {n} is not a multiple of the Hadamard size {size}")
    if block is None and n != size:
        raise ValueError(f"last dim {n} does not match the Hadamard size {size}")
    y = x.to(compute).reshape(-1, n // size, *factors)
    for axis, f in enumerate(factors):
        h = _factor_matrix(f, x.device, compute)
        if transpose:
            h = h.T
        y = torch.movedim(torch.movedim(y, axis + 2, -1) @ h, -1, axis + 2)
    return y.reshape(x.shape).to(x.dtype)
