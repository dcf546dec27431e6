"""The one dispatch layer between the model and its kernels.

Every quantized-model operation goes through a function here, with one signature for both
backends: CUDA tensors run the TileLang kernels (`kernels_tl.quantize`, `kernels_tl.gemm`), CPU
tensors run the PyTorch reference (`kernels_tl.reference`), which defines the numerics the kernels
are tested against. `QUAD_BACKEND=reference` forces the reference on the GPU too (for checking a
model end to end against it); cases the kernels do not cover (per-group weight scales, no online
Hadamard) fall back to the reference on their own.

The float16 boundaries are part of the numerics, on both backends: the norm and the Hadamard
quantizers read float16, the GEMMs and attention return float16, RoPE + head Hadamard (float32,
rounded once) returns float16, the KV cache quantizes float16 (its ops,
the store and attention over the paged cache: `quad_engine.kv_ops`).
Every activation quantizer turns a difference far below its step into whole-step flips with some
probability, so a reference that rounded elsewhere would drift from the kernels by percents over
a deep model; rounding at the same places keeps the two within float32 summation order.
"""

from __future__ import annotations

import functools
import os

import torch

from kernels_tl import reference as ref
from kernels_tl.hadamard import apply_hadamard
from quad_engine.config import HadamardSpec


ANNOTATE = False  # quad_engine.profiling sets it: each op below then runs in a profiler range "quad::<category>"


def device_sync() -> None:
    """Wait for the GPU (when one is in use)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _profiled(category: str):
    """File the op's kernels under `category` in a profile (quad_engine.profiling); no cost otherwise."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            if ANNOTATE:
                with torch.profiler.record_function(f"quad::{category}"):
                    return fn(*args, **kwargs)
            return fn(*args, **kwargs)
        return inner
    return wrap


@functools.lru_cache(maxsize=None)
def _kernels_importable() -> bool:
    try:
        import tilelang  # noqa: F401
    except ImportError:
        return False
    return True


def use_kernels(t: torch.Tensor) -> bool:
    """Whether `t` is handled by the TileLang kernels (CUDA tensor, tilelang installed, not forced off)."""
    backend = os.environ.get("QUAD_BACKEND", "auto")
    if backend not in ("auto", "reference", "tilelang"):
        raise ValueError(f"QUAD_BACKEND={backend!r}: expected auto, reference or tilelang")
    if backend == "reference" or not t.is_cuda:
        return False
    if not _kernels_importable():
        if backend == "tilelang":
            raise RuntimeError("QUAD_BACKEND=tilelang but tilelang is not installed (pip install '.[gpu]')")
        return False
    return True


def fusions_enabled() -> bool:
    """QUAD_FUSE=0 turns the fused kernel variants off (residual add and float32 read inside the
    norm, SwiGLU inside the down_proj quantizer): the same numerics through more kernels, for
    measuring what the fusions save and for isolating a kernel."""
    return os.environ.get("QUAD_FUSE", "1") != "0"


@_profiled("quantize")
def rmsnorm_quant(h: torch.Tensor, rank: int, hidden: int, eps: float, bits: int, clip: float,
                  residual=None, prefetch: "QuantWeights | None" = None):
    """Weightless RMSNorm of the widened residual, split into (x_out, x_q, x_scale).

    With `residual` (the previous branch's output, not yet added), h += residual in place first:
    the kernel does both in one pass over the row, the branch's GEMM epilogue too where it is a
    split-K GEMM's sums (quant_linear with into_residual). With bits >= 16 (unquantized mode) x_q
    is the float activation and x_scale is None. prefetch: the linear layer that reads the result,
    whose packed weights the kernel may start bringing into L2 (kernels_tl.l2_prefetch; off unless
    QUAD_L2_PREFETCH_MB is set): a hint, the outputs are the same.
    """
    kernels = bits < 16 and use_kernels(h) and rank % 16 == 0
    if kernels and fusions_enabled() and (residual is None or (h.dtype == torch.float32 and h.is_contiguous())):
        from kernels_tl.quantize import rmsnorm_quant_op
        return rmsnorm_quant_op(h, rank, hidden, eps, bits, clip, residual,
                                prefetch=None if prefetch is None else prefetch.qweight)
    residual = materialize(residual)
    if residual is not None:
        h += residual
    if bits >= 16:
        normed = ref.rmsnorm_widened(h, hidden, eps)
        return normed[..., :rank], normed[..., rank:], None
    if kernels:
        from kernels_tl.quantize import rmsnorm_quant_op
        return rmsnorm_quant_op(h.half(), rank, hidden, eps, bits, clip)
    # The kernels read the residual as float16: so does the reference (see module doc).
    x_out, x_q, x_scale = ref.rmsnorm_split_quant(h.half().float(), rank, hidden, eps, bits, clip)
    return x_out.half(), x_q, x_scale


def materialize(branch):
    """A branch output as a tensor: quant_linear(..., into_residual=True) may return a split-K GEMM's
    sums before their epilogue (kernels_tl.gemm_dispatch.SplitKSums), which the next norm takes as
    they are; any other use runs the epilogue here."""
    return branch.materialize() if hasattr(branch, "materialize") else branch


def l2_prefetch(weight: "QuantWeights", site: str, tokens: int) -> None:
    """Start bringing the first bytes of a linear layer's packed weights into L2 from a kernel of
    its own (kernels_tl.l2_prefetch), early in the run of small kernels before that layer's GEMM:
    only with QUAD_L2_PREFETCH_MB set, at decode sizes, at the sites QUAD_L2_PREFETCH_SITES names
    ("o", "down"; the norms carry "norm" themselves). A hint: nothing is computed."""
    w = weight.qweight
    if w is None or not use_kernels(w):
        return
    from kernels_tl import l2_prefetch as pf
    if pf.enabled(site, tokens):
        pf.l2_prefetch_op(w)


@_profiled("quantize")
def hadamard_quant(x: torch.Tensor, spec: HadamardSpec | None, bits: int, clip: float):
    """Online Hadamard over the last dim, then per-token quantization: (x_q, x_scale)."""
    if bits >= 16:
        return _hadamard_f32(x, spec), None
    x = x.half()  # float16 in, as the kernel reads it
    if spec is not None and use_kernels(x):
        from kernels_tl.hadamard_quant_dispatch import hadamard_quant_op
        return hadamard_quant_op(x, tuple(spec.factors), spec.block, bits, clip)
    return ref.quantize_act(_hadamard_f32(x, spec), bits, clip)


@_profiled("quantize")
def swiglu_hadamard_quant(gate_up: torch.Tensor, spec: HadamardSpec | None, bits: int, clip: float):
    """hadamard_quant(silu(gate) * up) of the MLP's gate_up [.., 2n] (gate first); the kernel
    computes the SwiGLU on load, in torch's float16 arithmetic."""
    if bits < 16 and spec is not None and use_kernels(gate_up) and fusions_enabled():
        from kernels_tl.hadamard_quant_dispatch import hadamard_quant_op
        return hadamard_quant_op(gate_up, tuple(spec.factors), spec.block, bits, clip, gated=True)
    if bits >= 16:  # unquantized mode: float32 throughout
        gate, up = gate_up.float().chunk(2, dim=-1)
        return hadamard_quant.__wrapped__(torch.nn.functional.silu(gate) * up, spec, bits, clip)
    return hadamard_quant.__wrapped__(ref.swiglu_f16(gate_up), spec, bits, clip)


def gate_up_swiglu(x_q: torch.Tensor, x_scale: torch.Tensor | None, weight: "QuantWeights",
                   x_out: torch.Tensor | None = None) -> torch.Tensor | None:
    """silu(gate) * up (float16 [.., h]) straight from the MLP's gate_up GEMM, whose epilogue
    computes it in torch's float16 arithmetic (kernels_tl.gemm_rs, swiglu), or None where that GEMM
    cannot (decode sizes, the reference backend, QUAD_FUSED_SWIGLU unset): the caller then runs the
    GEMM and swiglu_hadamard_quant. Either way the down_proj quantizer sees the same values."""
    if x_scale is None or not use_kernels(x_q) or not _gemm_supports(weight) or not fusions_enabled():
        return None
    from kernels_tl.gemm_dispatch import swiglu_fusable
    if not swiglu_fusable(x_q.numel() // x_q.shape[-1], weight.qweight.shape[0]):
        return None
    return quant_linear(x_q, x_scale, weight, x_out, swiglu=True)


# The int8 lm_head's activation quantizer: per token, int8, no clipping.
HEAD_BITS, HEAD_CLIP = 8, 1.0


def head_logits_int8(h: torch.Tensor, pending: torch.Tensor | None, cfg, head_out: torch.Tensor,
                     head_q: torch.Tensor, head_s: torch.Tensor) -> torch.Tensor:
    """float32 logits through the int8 lm_head from the last residual h (float32 [.., r + d]) and the
    last layer's output not yet added (pending): the final norm and the head's int8 quantization
    are one rmsnorm_quant pass (h += pending in place), then head_w8a8."""
    x_out, x_q, x_s = rmsnorm_quant(h, cfg.rank, cfg.hidden_size, cfg.rms_norm_eps, HEAD_BITS, HEAD_CLIP,
                                    residual=pending)
    return head_w8a8(x_out, x_q, x_s, head_out, head_q, head_s)


@_profiled("gemm")
def head_w8a8(x_out: torch.Tensor, x_q: torch.Tensor, x_scale: torch.Tensor, head_out: torch.Tensor,
              head_q: torch.Tensor, head_s: torch.Tensor) -> torch.Tensor:
    """float32 logits through the int8 lm_head (reference.head_w8a8) from the final norm's split.
    On CUDA, by token count: up to 4 the CUDA-core GEMV (kernels_tl.head_gemv: one pass over the
    table), up to 64 the decode GEMM on int8 weight rows (gemm_dispatch.w8a8_decode_linear: int8
    wgmma, the outlier product fused), above that torch._int_mm (more than 16 rows, a multiple of 8:
    padded) and a float16 GEMM for the outlier part. Decode steps thus never leave the project's
    kernels (CUDA graphs)."""
    if not use_kernels(x_q):
        return ref.head_w8a8(x_out, x_q, x_scale, head_out, head_q, head_s)
    r = head_out.shape[-1]
    lead = x_q.shape[:-1]
    q = x_q.reshape(-1, x_q.shape[-1])
    m = q.shape[0]
    x_out, sx = x_out.reshape(m, r).half(), x_scale.reshape(m, 1)
    from kernels_tl import gemm_dispatch, head_gemv
    if 0 < m <= head_gemv.GEMV_TOKENS[-1]:
        return head_gemv.head_w8a8_op(x_out, q, sx, head_out, head_q, head_s).reshape(*lead, -1)
    if m <= gemm_dispatch.DECODE_MAX_M and gemm_dispatch.w8a8_decode_supports(head_q.shape[0], head_q.shape[1], r):
        return gemm_dispatch.w8a8_decode_linear(q, sx, head_q, head_s, x_out, head_out).reshape(*lead, -1)
    rows = max(24, -(-m // 8) * 8)
    if rows > m:
        q = torch.cat([q, q.new_zeros(rows - m, q.shape[1])])
    ints = torch._int_mm(q, head_q.T)[:m]
    logits = ints.float() * sx * head_s + torch.nn.functional.linear(x_out, head_out).float()
    return logits.reshape(*lead, -1)


def prebuild_head(model, token_counts, workers: int = 16) -> None:
    """Compile the int8 lm_head's decode kernels (GEMV and int8-weight decode GEMM) for these token
    counts in parallel, before the graph captures need them."""
    try:
        from kernels_tl import gemm_dispatch, head_gemv
    except ImportError:
        return
    n, d = model.head_q.shape
    r = model.head_out.shape[-1]
    widths = {next(t for t in head_gemv.GEMV_TOKENS if t >= m) for m in token_counts if m <= head_gemv.GEMV_TOKENS[-1]}
    head_gemv.prebuild([(n, d, r)], sorted(widths), workers)
    if gemm_dispatch.w8a8_decode_supports(n, d, r):
        gemm_dispatch.prebuild_w8a8([(m, n, d, r) for m in token_counts
                                     if head_gemv.GEMV_TOKENS[-1] < m <= gemm_dispatch.DECODE_MAX_M], workers)


def prebuild_quantizers(cfg, token_counts, int8_head: bool = False, workers: int = 16) -> None:
    """Compile, in parallel, the norm and Hadamard quantizer variants the kernels above will run for
    this model at these token counts (the residual modes of the norm; the Hadamard kernel of each
    token-count class; with int8_head the final norm's, head_logits_int8), instead of one at a time
    inside the first steps and graph captures."""
    from concurrent.futures import ThreadPoolExecutor

    try:
        from kernels_tl import hadamard_quant_dispatch, quantize
    except ImportError:
        return
    from kernels_tl.gemm_dispatch import SPLITK_INTO_NORM
    bits = cfg.act_bits
    modes = ("float16", "float32", "add") + (("splitk",) if SPLITK_INTO_NORM else ()) if fusions_enabled() \
        else ("float16",)
    jobs = []
    # The norm's threads a block depend on the token count (quantize.norm_threads), and so do its L2
    # prefetch blocks (quantize.prefetch_blocks, the layers' norms only); keyword arguments as
    # rmsnorm_quant_op passes them, so these builds are the ones its calls find in the cache.
    threads = {quantize.norm_threads(m) for m in token_counts}
    variants = {(mode, quantize.norm_threads(m), quantize.prefetch_blocks(m, mode))
                for mode in modes for m in token_counts}
    for site in ("qkv", "gate_up"):
        if bits[site] < 16 and cfg.rank % 16 == 0:
            jobs += [functools.partial(quantize.rmsnorm_quant, cfg.rank + cfg.hidden_size, cfg.rank, cfg.hidden_size,
                                       bits[site], float(cfg.act_clip), float(cfg.rms_norm_eps), threads=t,
                                       residual=mode, prefetch_blocks=blocks)
                     for mode, t, blocks in variants]
    if int8_head and cfg.rank % 16 == 0:
        jobs += [functools.partial(quantize.rmsnorm_quant, cfg.rank + cfg.hidden_size, cfg.rank, cfg.hidden_size,
                                   HEAD_BITS, float(HEAD_CLIP), float(cfg.rms_norm_eps), threads=t,
                                   residual="add" if fusions_enabled() else "float16")
                 for t in threads]
    problems = [(spec.size, tuple(spec.factors), spec.block, bits[site], float(cfg.act_clip), gated)
                for spec, site, gated in ((cfg.hadamard_o, "o", False), (cfg.hadamard_down, "down", fusions_enabled()))
                if spec is not None and bits[site] < 16]
    jobs += hadamard_quant_dispatch.prebuild_jobs(set(problems), token_counts)
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda job: job(), jobs))


@_profiled("hadamard")
def rope_hadamard(x: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """RoPE then the head Hadamard as one batched float32 matmul (the unquantized mode): x [B, T,
    heads, hd], matrices [B or 1, T, hd, hd] (models.llama.rope_hadamard_matrices)."""
    return torch.matmul(x.float(), matrices)


@_profiled("hadamard")
def hadamard(x: torch.Tensor, spec: HadamardSpec | None) -> torch.Tensor:
    return _hadamard_f32(x, spec)


def _hadamard_f32(x: torch.Tensor, spec: HadamardSpec | None) -> torch.Tensor:
    return x.float() if spec is None else apply_hadamard(x.float(), spec.factors, spec.block)


@_profiled("gemm")
def quant_linear(x_q: torch.Tensor, x_scale: torch.Tensor | None, weight: "QuantWeights",
                 x_out: torch.Tensor | None = None, into_residual: bool = False, swiglu: bool = False):
    """y = dequant(x_q) @ dequant(W)ᵀ + x_out @ w_outᵀ + bias, with the integer part exact.

    float16 out (float32 in the unquantized mode), from either backend. into_residual: y only goes
    into the residual, through rmsnorm_quant's residual (or materialize): a split-K decode GEMM may
    then return its sums before the epilogue, which the norm applies in its own pass. swiglu (only
    where gate_up_swiglu found the GEMM can): silu(gate) * up of the gate_up output instead."""
    lead = x_q.shape[:-1]
    x2 = x_q.reshape(-1, x_q.shape[-1])
    xo = None if x_out is None or x_out.shape[-1] == 0 else x_out.reshape(-1, x_out.shape[-1])
    if x_scale is None:  # unquantized mode: float weights
        y = x2.float() @ weight.weight.float().T
        if xo is not None and weight.w_out is not None:
            y = y + xo.float() @ weight.w_out.float().T
        if weight.bias is not None:
            y = y + weight.bias.float()
    elif use_kernels(x2) and _gemm_supports(weight):
        from kernels_tl.gemm_dispatch import w4ax_linear
        y = w4ax_linear(x2.contiguous(), x_scale.reshape(-1).float(), weight.qweight, weight.scale.reshape(-1).half(),
                        None if xo is None else xo.half().contiguous(), weight.w_out, weight.bias,
                        into_residual=into_residual, swiglu=swiglu)
        if not isinstance(y, torch.Tensor):  # SplitKSums
            y.lead = tuple(lead)
            return y
    else:
        y = ref.quant_linear(x2, x_scale.reshape(-1, 1), weight.unpacked(), weight.scale,
                             None if xo is None else xo.half().float(), weight.w_out, weight.bias).half()
    return y.reshape(*lead, y.shape[-1])


def _gemm_supports(weight: "QuantWeights") -> bool:
    """Shapes the TileLang GEMMs take: per-row weight scales, K a multiple of 64, an outlier rank
    that is 0 or a multiple of 32 (the GEMV splits it over a warp's lanes). Others run the reference."""
    rank = 0 if weight.w_out is None else weight.w_out.shape[1]
    k = weight.qweight.shape[1] * 2
    return weight.scale.shape[-1] == 1 and k % 64 == 0 and rank % 32 == 0


class QuantWeights(torch.nn.Module):
    """One linear layer's stored tensors, as the checkpoint holds them.

    qweight: packed int4 [N, K / 2] (uint8) with scale [N, G]; or, in unquantized mode, weight
    [N, K] floats. The reference backend unpacks qweight on first use and keeps the int values as
    float32 (so its integer matmul runs exactly on the float units); the kernels read it packed.
    """

    def __init__(self, qweight: torch.Tensor | None, scale: torch.Tensor | None, w_out: torch.Tensor | None,
                 bias: torch.Tensor | None, weight: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self.register_buffer("w_out", w_out)
        self.register_buffer("bias", bias)
        self._unpacked: tuple[int, torch.Tensor] | None = None

    def unpacked(self) -> torch.Tensor:
        key = self.qweight.data_ptr()
        if self._unpacked is None or self._unpacked[0] != key:
            self._unpacked = (key, ref.unpack_int4(self.qweight).float())
        return self._unpacked[1]

    def forward(self, x_q: torch.Tensor, x_scale: torch.Tensor | None,
                x_out: torch.Tensor | None = None, into_residual: bool = False):
        return quant_linear(x_q, x_scale, self, x_out, into_residual)

    @classmethod
    def from_checkpoint(cls, tensors: dict[str, torch.Tensor], prefix: str) -> "QuantWeights":
        get = tensors.get
        if prefix + "qweight" in tensors:
            return cls(get(prefix + "qweight"), get(prefix + "wscale"), get(prefix + "w_out"), get(prefix + "bias"))
        return cls(None, None, get(prefix + "w_out"), get(prefix + "bias"), weight=get(prefix + "weight"))
