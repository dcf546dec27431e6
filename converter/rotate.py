"""Offline transforms: norm fusion, QUAD's projection P, the widened residual, fused Hadamards.

All algebra runs in float64 so the transformed model matches the original to float32 rounding.
Notation: d = hidden size, r = outlier rank, D = r + d. A row vector h of the original residual
stream becomes h @ M with M = Q @ R (d x D), where Q = [P, I - PPᵀ] moves the top-r directions of the
residual stream into r extra channels and R = block_diag(H_r, H_d) is a randomized Hadamard per block.
QQᵀ = I and R is orthogonal, so every norm and every inner product of the stream is preserved.
"""

from __future__ import annotations

import warnings

import torch

from kernels_tl.hadamard import (apply_hadamard, block_hadamard_size, hadamard_factors,
                                 has_hadamard, random_hadamard)
from quad_engine.config import HadamardSpec


def projection_from_covariance(xtx: torch.Tensor, rank: int) -> torch.Tensor:
    """P = the top-`rank` eigenvectors of the residual stream's XᵀX (d x r, orthonormal columns)."""
    eigvals, eigvecs = torch.linalg.eigh(xtx.double())
    order = torch.argsort(eigvals, descending=True)
    return eigvecs[:, order[:rank]].contiguous()


def quad_q(p: torch.Tensor) -> torch.Tensor:
    """Q = [P, I - PPᵀ], d x (r + d), with QQᵀ = I."""
    d = p.shape[0]
    return torch.cat([p, torch.eye(d, dtype=p.dtype, device=p.device) - p @ p.T], dim=1)


def residual_rotation(d: int, r: int, seed: int, device=None) -> tuple[torch.Tensor, dict]:
    """block_diag(H_r, H_d), each a randomized Hadamard (random orthogonal if none exists)."""
    blocks, kinds = [], {}
    for name, n, s in (("outlier", r, seed + 1), ("main", d, seed)):
        if n == 0:
            continue
        kinds[name] = "hadamard" if has_hadamard(n, max_factor=None) else "random_orthogonal"
        blocks.append(random_hadamard(n, s).to(device))
    return torch.block_diag(*blocks), {"kind": "randomized_hadamard", "seed": seed, "blocks": kinds}


def online_spec(n: int, what: str) -> HadamardSpec:
    """The online Hadamard of size n: one exact transform, or a recorded block-diagonal fallback."""
    factors = hadamard_factors(n)
    if factors is not None:
        return HadamardSpec(size=n, factors=factors)
    block = block_hadamard_size(n)
    warnings.warn(f"no Hadamard matrix of order {n} is known ({what}); using a block-diagonal "
                  f"transform of {n // block} blocks of {block} (recorded in quad_config.json)")
    return HadamardSpec(size=n, factors=hadamard_factors(block), block=block)


def hadamard_rows(w: torch.Tensor, spec: HadamardSpec | None) -> torch.Tensor:
    """w @ H for the online Hadamard H of `spec` (w's rows are transformed like activations)."""
    return w if spec is None else apply_hadamard(w, spec.factors, spec.block)


def transform_layer(w: dict[str, torch.Tensor], m: torch.Tensor | None, num_heads: int, num_kv_heads: int,
                    head: HadamardSpec | None, online_o: HadamardSpec | None,
                    online_down: HadamardSpec | None) -> dict[str, torch.Tensor]:
    """One decoder layer's original weights -> the transformed model's float64 weights.

    `w` holds HF's tensors under short names (q, k, v, o, gate, up, down, ln1, ln2, and q_bias,
    k_bias, v_bias when present). Returns fused readers qkv [Nqkv, D] and gate_up [2F, D] (the norm
    weight folded into their columns, then @ M), writers o [D, H*hd] and down [D, F] (Mᵀ @ W with
    the online Hadamards' inverses folded into their input side), and qkv_bias.
    With m = None and no Hadamards this is just the fusion of the original model.
    """
    hd = w["q"].shape[0] // num_heads

    def read(mat: torch.Tensor, ln: torch.Tensor) -> torch.Tensor:
        mat = mat.double() * ln.double()
        return mat if m is None else mat @ m

    def write(mat: torch.Tensor) -> torch.Tensor:
        mat = mat.double()
        return mat if m is None else m.T @ mat

    def per_head(mat: torch.Tensor) -> torch.Tensor:
        """mat @ blockdiag(H_hd, ..., H_hd) along the last dim."""
        if head is None:
            return mat
        return hadamard_rows(mat.reshape(*mat.shape[:-1], -1, hd), head).reshape(mat.shape)

    # V's head_dim Hadamard is fused here (v -> v @ H_hd per head) so the V cache is quantized in the
    # rotated basis; o_proj undoes it on its input side below.
    v = per_head(w["v"].double().T).T
    qkv = read(torch.cat([w["q"], w["k"], v]), w["ln1"])
    out = {"qkv": qkv}
    if "q_bias" in w:
        out["qkv_bias"] = torch.cat([w["q_bias"].double(), w["k_bias"].double(),
                                     per_head(w["v_bias"].double())])
    # o_proj input arrives as z (I ⊗ H_hd) T_o, so o_proj's weight takes Wo (I ⊗ H_hd) T_o.
    out["o"] = write(hadamard_rows(per_head(w["o"].double()), online_o))
    out["gate_up"] = read(torch.cat([w["gate"], w["up"]]), w["ln2"])
    out["down"] = write(hadamard_rows(w["down"].double(), online_down))
    return out
