"""The one dispatch layer between the model and its kernels.

Every quantized-model operation the engine runs goes through a function here. Today each one is
the PyTorch reference from `kernels_tl.reference` (CPU and GPU); the TileLang kernels plug in
behind the same signatures, so the model file never changes when a kernel lands.
"""

from __future__ import annotations

import torch

from kernels_tl import reference as ref
from kernels_tl.hadamard import apply_hadamard
from quad_engine.config import HadamardSpec


def rmsnorm_quant(h: torch.Tensor, rank: int, hidden: int, eps: float, bits: int, clip: float):
    """Weightless RMSNorm of the widened residual, split into (x_out, x_q, x_scale).

    With bits >= 16 (unquantized mode) x_q is the float activation and x_scale is None.
    """
    if bits >= 16:
        normed = ref.rmsnorm_widened(h, hidden, eps)
        return normed[..., :rank], normed[..., rank:], None
    return ref.rmsnorm_split_quant(h, rank, hidden, eps, bits, clip)


def hadamard_quant(x: torch.Tensor, spec: HadamardSpec | None, bits: int, clip: float):
    """Online Hadamard over the last dim, then per-token quantization: (x_q, x_scale)."""
    if spec is not None:
        x = apply_hadamard(x.float(), spec.factors, spec.block)
    if bits >= 16:
        return x.float(), None
    return ref.quantize_act(x, bits, clip)


def hadamard(x: torch.Tensor, spec: HadamardSpec | None) -> torch.Tensor:
    return x.float() if spec is None else apply_hadamard(x.float(), spec.factors, spec.block)


def quant_linear(x_q: torch.Tensor, x_scale: torch.Tensor | None, weight: "QuantWeights",
                 x_out: torch.Tensor | None = None) -> torch.Tensor:
    """y = dequant(x_q) @ dequant(W)ᵀ + x_out @ w_outᵀ + bias, with the integer part exact."""
    lead = x_q.shape[:-1]
    x2 = x_q.reshape(-1, x_q.shape[-1])
    xo = None if x_out is None or x_out.shape[-1] == 0 else x_out.reshape(-1, x_out.shape[-1])
    if x_scale is None:  # unquantized mode: weight.values holds float weights
        y = x2.float() @ weight.values.T
        if xo is not None and weight.w_out is not None:
            y = y + xo.float() @ weight.w_out.float().T
        if weight.bias is not None:
            y = y + weight.bias.float()
    else:
        y = ref.quant_linear(x2, x_scale.reshape(-1, 1), weight.values, weight.scale, xo,
                             weight.w_out, weight.bias)
    return y.reshape(*lead, y.shape[-1])


class QuantWeights(torch.nn.Module):
    """One linear layer's stored tensors, as the reference backend wants them.

    values: int8-valued weights unpacked once at load (float32 on the reference path, so the
    integer matmul runs on the float units exactly), or float weights in unquantized mode.
    """

    def __init__(self, values: torch.Tensor, scale: torch.Tensor | None, w_out: torch.Tensor | None,
                 bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("values", values)
        self.register_buffer("scale", scale)
        self.register_buffer("w_out", w_out)
        self.register_buffer("bias", bias)

    def forward(self, x_q: torch.Tensor, x_scale: torch.Tensor | None,
                x_out: torch.Tensor | None = None) -> torch.Tensor:
        return quant_linear(x_q, x_scale, self, x_out)

    @classmethod
    def from_checkpoint(cls, tensors: dict[str, torch.Tensor], prefix: str) -> "QuantWeights":
        if prefix + "qweight" in tensors:
            values = ref.unpack_int4(tensors[prefix + "qweight"]).float()
            scale = tensors[prefix + "wscale"]
        else:
            values = tensors[prefix + "weight"].float()
            scale = None
        return cls(values, scale, tensors.get(prefix + "w_out"), tensors.get(prefix + "bias"))
