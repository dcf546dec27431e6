"""Weight quantization: round-to-nearest and GPTQ (Frantar et al., 2022), 4-bit symmetric.

Scales and integer values always come from `kernels_tl.reference` (weight_scale, quantize_weight),
so what GPTQ stores is exactly what the reference backend and the kernels dequantize. Scales are
fixed before the column loop (per row, or per static group), so the stored groups stay contiguous
in natural column order even with act-order: no g_idx anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels_tl import reference as ref

MSE_GRID = torch.arange(100, 69, -1) / 100   # shrink factors 1.00 .. 0.70
MSE_NORM = 2.4                               # GPTQ's Quantizer(mse=True) error norm


@dataclass
class QuantizedWeight:
    q: torch.Tensor        # int8 [N, K], values in [-8, 7]
    scale: torch.Tensor    # float16 [N, 1] or [N, K // group_size]

    def dequantize(self) -> torch.Tensor:
        return ref.dequantize_weight(self.q, self.scale)


class HessianAccumulator:
    """Streams a linear layer's inputs into GPTQ's Hessian 2/n · Σ xᵀx (accumulated in float64)."""

    def __init__(self, in_features: int, device=None):
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x2 = x.reshape(-1, x.shape[-1]).to(self.sum.device, torch.float64)
        self.sum.addmm_(x2.T, x2)
        self.count += x2.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        return (2 * self.sum / max(self.count, 1)).float()


def find_scale(w: torch.Tensor, bits: int, group_size: int, mse_clip: bool) -> torch.Tensor:
    """Per-row (or per-group) scale; with mse_clip, the shrink of max|w| minimising Σ|err|^2.4."""
    if not mse_clip:
        return ref.weight_scale(w, bits, group_size)
    n, k = w.shape
    groups = 1 if group_size == -1 else k // group_size
    best_err = torch.full((n, groups), float("inf"), device=w.device)
    best = torch.ones(n, groups, device=w.device)
    wg = w.float().reshape(n, groups, k // groups)
    for c in MSE_GRID.tolist():
        scale = ref.weight_scale(w, bits, group_size, clip=c)
        err = (ref.dequantize_weight(ref.quantize_weight(w, scale, bits), scale).reshape(n, groups, -1) - wg)
        err = err.abs().pow(MSE_NORM).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, c), best)
    return ref.weight_scale(w, bits, group_size, clip=best)


def quantize_rtn(w: torch.Tensor, bits: int = 4, group_size: int = -1, mse_clip: bool = False) -> QuantizedWeight:
    scale = find_scale(w, bits, group_size, mse_clip)
    return QuantizedWeight(ref.quantize_weight(w, scale, bits), scale)


def _quantize_column(col: torch.Tensor, scale_col: torch.Tensor, bits: int) -> torch.Tensor:
    qmin, qmax = ref.qrange(bits)
    return torch.clamp(torch.round(col / scale_col), qmin, qmax)


def quantize_gptq(w: torch.Tensor, hessian: torch.Tensor, bits: int = 4, group_size: int = -1,
                  blocksize: int = 128, percdamp: float = 0.01, act_order: bool = True,
                  mse_clip: bool = True) -> tuple[QuantizedWeight, float]:
    """GPTQ with lazy block updates. Returns the quantized weight and GPTQ's summed loss."""
    w = w.float().clone()
    n, k = w.shape
    h = hessian.float().clone().to(w.device)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    scale = find_scale(w, bits, group_size, mse_clip)                # [N, G], fixed up front
    gs = k if group_size == -1 else group_size
    col_scale = scale.float().repeat_interleave(gs, dim=1)            # [N, K], each column's scale

    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k, device=w.device)
    w, h, col_scale = w[:, perm], h[perm][:, perm], col_scale[:, perm]
    hinv = _inverse_cholesky(h, percdamp)

    q = torch.zeros_like(w)
    losses = torch.zeros(n, device=w.device)
    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        for j in range(i2 - i1):
            col, d = w1[:, j], hinv1[j, j]
            qc = _quantize_column(col, col_scale[:, i1 + j], bits)
            q[:, i1 + j] = qc
            deq = qc * col_scale[:, i1 + j]
            losses += (col - deq) ** 2 / d ** 2 / 2
            e = (col - deq) / d
            w1[:, j:] -= e.unsqueeze(1) @ hinv1[j, j:].unsqueeze(0)
            err1[:, j] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    inv = torch.argsort(perm)
    return QuantizedWeight(q[:, inv].to(torch.int8), scale), float(losses.sum())


def _inverse_cholesky(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of H⁻¹ with damping; more damping if H is numerically indefinite."""
    k = h.shape[0]
    damp = percdamp * torch.mean(torch.diag(h))
    eye = torch.eye(k, device=h.device)
    for _ in range(5):
        chol, info = torch.linalg.cholesky_ex(h + damp * eye)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)
            chol_inv, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return chol_inv
        damp = damp * 10
    raise RuntimeError("GPTQ: the Hessian is not positive definite even with heavy damping")
