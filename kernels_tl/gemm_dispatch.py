"""Which W4A4 / W4A8 GEMM kernel runs a problem, and the call (`w4ax_linear`, the GEMM's entry point
in the dispatch layer): the CUDA-core GEMV for M <= 4, for M <= 64 the tensor-core decode kernel
(epilogue fused where one block covers K, else split-K + epilogue kernel; the weights unpacked into
the wgmma's register operand), the prefill kernel above that (the weights unpacked into the wgmma's
register operand too; the kernels themselves: `kernels_tl.gemm`, `kernels_tl.gemm_rs`,
`kernels_tl.gemm_ws`). The tiles of each kernel come from `kernels_tl.gemm_plans`, as functions of
the shape only, so one compiled kernel serves every M of a class, and `prebuild` compiles an
engine's whole set in parallel before the first step.
"""

import dataclasses
import os

from kernels_tl.buffers import zeros
from kernels_tl.gemm import w4ax_gemm
from kernels_tl.gemm_decode import w4ax_epilogue, w4ax_gemm_decode, w4ax_gemm_splitk
from kernels_tl.gemm_plans import (DECODE_WS_TILES, RS_TOKEN_COST, WS_TILES, decode_plan, decode_ws_fits, fit_k,
                                   prefill_candidates, prefill_tiles, rs_fit, rs_tiles)
from kernels_tl.gemm_rs import w4ax_gemm_rs
from kernels_tl.gemm_ws import w4ax_gemm_decode_ws, w4ax_gemm_ws
from kernels_tl.gemv import w4ax_gemv

GEMV_TOKENS = (1, 2, 4)  # compiled token widths of the CUDA-core kernel; larger M goes to tensor cores
DECODE_MAX_M = 64
# From 1024 tokens the prefill kernel with the weights unpacked into the wgmma's register operand
# and the tokens as its N side (kernels_tl.gemm_rs), 128 weight rows x 256 tokens a tile: against
# the producer-unpack kernel (kernels_tl.gemm_ws, 256 tokens x 128 weight rows, the weights
# unpacked into shared memory), qkv / o / gate_up / down 1.40 / 1.31 / 1.33 / 1.25x at 2048 tokens
# and 1.38 / 1.29 / 1.27 / 1.19x at 8192 (1195-1607 int8 TOPS; bench/results/gemm_rs_prefill_h200_2026-12-02.json).
# QUAD_PREFILL_GEMM=ws keeps the producer-unpack kernel, =pipelined TileLang's pipelined kernel
# (prefill_tiles) there too.
# Above 64 tokens and under 1024 it is 1.3-3x TileLang's pipelined kernel (128-512 tokens,
# gemm_rs_middle_h200_2026-12-02.json), with 128-token tiles where they fill the SMs in fewer
# waves (rs_tiles).
PREFILL_GEMM = os.environ.get("QUAD_PREFILL_GEMM", "rs")  # rs | ws | pipelined
# QUAD_FUSED_SWIGLU=1: the MLP's gate_up GEMM above 64 tokens writes silu(gate) * up itself
# (gemm_rs's swiglu epilogue), half the bytes, and the down_proj quantizer runs without the SwiGLU
# (ops.gate_up_swiglu). Off by default: measured (2026-12-02), its GEMM lost more than the plain
# quantizer saves (docs/results.md).
FUSED_SWIGLU = os.environ.get("QUAD_FUSED_SWIGLU", "0") == "1"
# Decode GEMMs (5-64 tokens) unpack the weights into the wgmma's register operand
# (gemm_decode._register_unpack_gemm) in the pipelined kernels, fused or split-K: against the
# shared-memory unpack, qkv 1.13-1.18x and gate_up 1.02-1.13x at 16-64 tokens from CUDA graphs, and
# a b32 step's GEMM device time 2.68 -> 2.45 ms (bench/results/gemm_rs_decode_h200_2026-12-01.json,
# decode_ab_h200_2026-12-01d.json). Two fragments, each chunk unpacked while the last chunk's
# wgmmas run (overlap_unpack): 1.02-1.05x one fragment at every Llama-3-8B decode GEMM, a b32 step
# 4.141 / 4.349 -> 4.024 / 4.010 ms in two pairs of runs (gemm_rs2_decode_h200_2026-12-02.json,
# decode_ab_h200_2026-12-02c.json). QUAD_DECODE_GEMM=rs1: one fragment; =ws: the shared-memory unpack, in
# w4ax_gemm_decode_ws (producer-unpack, two blocks a SM) for grids of DECODE_WS_MIN_WAVES waves or
# more without a K split (gate_up: 1.07-1.13x the pipelined kernel; 0.75-0.86x elsewhere,
# gemm_ws_decode_h200_2026-12-01.json) and the pipelined kernels elsewhere; =pipelined: the
# pipelined kernels everywhere.
DECODE_GEMM = os.environ.get("QUAD_DECODE_GEMM", "rs")  # rs | rs1 | ws | pipelined
# A split-K GEMM whose output only goes into the residual (o_proj, down_proj) hands its int32 sums
# to the next norm, which applies the epilogue in its pass over the row (SplitKSums,
# quantize.rmsnorm_quant's "splitk" mode): one launch fewer per split-K GEMM
# (QUAD_SPLITK_INTO_NORM=0: the epilogue kernel, then the norm).
SPLITK_INTO_NORM = os.environ.get("QUAD_SPLITK_INTO_NORM", "1") != "0"


def _spec(builder, *args, **kwargs) -> tuple:
    """A kernel as (builder, args, kwargs): built by calling the builder in exactly this form (its
    lru_cache keys on the call's form, so the prebuild and the call must match)."""
    return builder, args, tuple(sorted(kwargs.items()))


def _build(spec):
    builder, args, kwargs = spec
    return builder(*args, **dict(kwargs))


def swiglu_fusable(m: int, n: int) -> bool:
    """Whether the gate_up GEMM of m tokens, n = 2h output rows, writes silu(gate) * up itself
    (w4ax_linear(..., swiglu=True)): the register-unpack prefill kernel with FUSED_SWIGLU."""
    return FUSED_SWIGLU and PREFILL_GEMM == "rs" and m > DECODE_MAX_M and n % 128 == 0


def _rs_spec(n: int, k: int, rank: int, has_bias: bool, out_dtype: str, tiles: dict, swiglu: bool = False) -> tuple:
    """The register-unpack prefill kernel at these tiles; swiglu: its SwiGLU epilogue form, with the
    silu the gated quantizers run at prefill sizes (hadamard_quant_dispatch.FAST_SILU)."""
    if not swiglu:
        return _spec(w4ax_gemm_rs, n, k, rank, has_bias, out_dtype, **tiles)
    from kernels_tl.hadamard_quant_dispatch import FAST_SILU
    return _spec(w4ax_gemm_rs, n, k, rank, has_bias, out_dtype, **tiles, swiglu=True, fast_silu=FAST_SILU)


def _rs_tile_class(m: int, n: int, k: int) -> list[dict]:
    """The tiles rs_tiles may pick for a prefill of m tokens's class: from 1024 tokens its choice
    (256-token tiles), below both token tiles (the choice changes with m within the class)."""
    if m >= 1024:
        return [rs_tiles(m, n, k)]
    return [rs_fit(n, k, t) for t in RS_TOKEN_COST]


def _swiglu_spec(m: int, n: int, k: int, rank: int, has_bias: bool) -> tuple:
    return _rs_spec(n, k, rank, has_bias, "float16", rs_tiles(m, n, k), swiglu=True)


def kernel_specs(m: int, n: int, k: int, rank: int, has_bias: bool, out_dtype: str) -> list[tuple]:
    """The kernels `w4ax_linear` runs for one problem, in call order, as _spec tuples."""
    if m <= GEMV_TOKENS[-1] and n % 16 == 0:
        return [_spec(w4ax_gemv, n, k, rank, has_bias, out_dtype, next(t for t in GEMV_TOKENS if t >= m))]
    if m <= DECODE_MAX_M:
        rs = ({"register_unpack": True, "overlap_unpack": True} if DECODE_GEMM == "rs" else
              {"register_unpack": True} if DECODE_GEMM == "rs1" else {})
        plan = decode_plan(m, n, k, resident=None if rs else 1)  # resident blocks: register unpack only
        if DECODE_GEMM == "ws" and decode_ws_fits(m, n, k, plan):
            return [_spec(w4ax_gemm_decode_ws, n, k, rank, has_bias, out_dtype, plan["block_m"], **DECODE_WS_TILES)]
        if plan["split"] == 1:  # one block covers K: the epilogue runs in the same kernel
            extra = {key: plan[key] for key in ("min_blocks", "ws_blocks") if key in plan}
            extra.update(rs)
            return [_spec(w4ax_gemm_decode, n, k, rank, has_bias, out_dtype, plan["block_m"], plan["block_k"],
                          plan["num_stages"], **extra)]
        return [_spec(w4ax_gemm_splitk, n, k, **plan, **rs),
                _spec(w4ax_epilogue, n, rank, has_bias, out_dtype, plan["block_m"])]
    if PREFILL_GEMM == "rs":
        return [_rs_spec(n, k, rank, has_bias, out_dtype, rs_tiles(m, n, k))]
    if PREFILL_GEMM != "pipelined" and m >= 1024:
        return [_spec(w4ax_gemm_ws, n, k, rank, has_bias, out_dtype, **fit_k(WS_TILES, k))]
    return [_spec(w4ax_gemm, n, k, rank, has_bias, out_dtype, **prefill_tiles(m, n, k, rank, has_bias))]


def kernels_for(m: int, n: int, k: int, rank: int, has_bias: bool, out_dtype: str) -> list:
    """The compiled kernels `w4ax_linear` runs for one problem, in call order."""
    return [_build(spec) for spec in kernel_specs(m, n, k, rank, has_bias, out_dtype)]


def _build_all(specs, workers: int = 16) -> None:
    """Build every distinct kernel of `specs` once, in parallel (TileLang compiles through nvcc
    subprocesses, so threads overlap; token counts of one class share their kernels)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(_build, dict.fromkeys(specs)))


def w8a8_decode_supports(n: int, k: int, rank: int) -> bool:
    """Whether the decode GEMM takes an int8-weight [n, k] problem with `rank` outlier columns."""
    return n % 64 == 0 and k % 64 == 0 and rank % 16 == 0


def _w8a8_spec(m: int, n: int, k: int, rank: int) -> tuple:
    """The int8-weight decode GEMM for M = m (float32 out; the int8 lm_head): one block covers K."""
    plan = decode_plan(m, n, k, min_blocks=1, resident=1)  # int8 weight tiles: the kernel's other shared-memory plan
    return _spec(w4ax_gemm_decode, n, k, rank, False, "float32", plan["block_m"], plan["block_k"],
                 plan["num_stages"], 8)


def w8a8_decode_linear(x_q, x_scale, w_q, w_scale, x_out=None, w_out=None, out=None):
    """float32 [M, n] = (x_q · w_qᵀ) · sx · sw + x_out · w_outᵀ for int8 weight rows w_q [n, k] with
    float32 scales (reference.head_w8a8's integer and outlier parts), M <= DECODE_MAX_M."""
    import torch

    m, k = x_q.shape
    n = w_q.shape[0]
    rank = 0 if w_out is None else w_out.shape[1]
    dev = x_q.device
    if rank == 0:
        x_out, w_out = _no_outliers(m, n, dev)
    bias = _bias_or_zeros(None, n, dev)
    y = out if out is not None else torch.empty(m, n, dtype=torch.float32, device=dev)
    _build(_w8a8_spec(m, n, k, rank))(x_q, x_scale.reshape(-1).float(), w_q, w_scale.reshape(-1).float(),
                                      x_out.contiguous(), w_out.contiguous(), bias, y)
    return y


def prebuild_w8a8(problems, workers: int = 16) -> None:
    """Compile the int8-weight decode GEMM for many (m, n, k, rank) in parallel."""
    _build_all([_w8a8_spec(*p) for p in problems], workers)


def prebuild(problems, workers: int = 16, swiglu_problems=()) -> None:
    """Compile the kernels for many (m, n, k, rank, has_bias, out_dtype) problems in parallel; for a
    prefill size under 1024 tokens, every tile configuration rs_tiles / prefill_tiles may pick at
    some token count of its class. swiglu_problems: (m, n, k, rank, has_bias) of gate_up GEMMs whose
    fused SwiGLU form (swiglu_fusable) is built too, both token tiles under 1024 tokens."""
    specs = [_rs_spec(n, k, rank, has_bias, "float16", t, swiglu=True)
             for m, n, k, rank, has_bias in sorted(set(swiglu_problems)) if swiglu_fusable(m, n)
             for t in _rs_tile_class(m, n, k)]
    for m, n, k, rank, has_bias, out_dtype in sorted(set(problems)):
        if m <= DECODE_MAX_M or PREFILL_GEMM != "pipelined" and m >= 1024:
            specs += kernel_specs(m, n, k, rank, has_bias, out_dtype)
        elif PREFILL_GEMM == "rs":
            specs += [_rs_spec(n, k, rank, has_bias, out_dtype, t) for t in _rs_tile_class(m, n, k)]
        else:
            specs += [_spec(w4ax_gemm, n, k, rank, has_bias, out_dtype, **t)
                      for t in prefill_candidates(m, k, rank, has_bias)]
    _build_all(specs, workers)


def _no_outliers(m: int, n: int, dev) -> tuple:
    """Zero stand-ins (x_out [m, 16], w_out [n, 16]) for the outlier operands of a problem without them."""
    import torch
    return zeros("x_out", m, 16, torch.float16, dev), zeros("w_out", n, 16, torch.float16, dev)


def _bias_or_zeros(bias, n: int, dev):
    import torch
    return zeros("bias", n, 1, torch.float16, dev).view(n) if bias is None else bias


@dataclasses.dataclass
class SplitKSums:
    """A split-K GEMM's output before its epilogue: Y = ACC · sx · sw / 16 (no outliers, no bias)
    as float16, with ACC the int32 sums in the shared workspace. The norm that adds the branch to the
    residual applies it in its pass (quantize.rmsnorm_quant's "splitk" mode) and leaves ACC zero;
    anything else calls materialize(), the epilogue kernel. The workspace belongs to every split-K
    GEMM of this width: the sums must be consumed before the next such GEMM runs (the layer's
    next norm comes first)."""

    acc: "torch.Tensor"  # noqa: F821  int32 [m, n]
    x_scale: "torch.Tensor"  # noqa: F821  float32 [m]
    w_scale: "torch.Tensor"  # noqa: F821  float16 [n]
    epilogue: object  # the compiled w4ax_epilogue of the problem
    lead: tuple = ()  # the leading shape of the output (quant_linear's callers): [*lead, n]

    def materialize(self):
        """The float16 output [*lead, n], through the epilogue kernel (which zeroes ACC)."""
        import torch

        m, n = self.acc.shape
        dev = self.acc.device
        x_out, w_out = _no_outliers(m, n, dev)
        y = torch.empty(m, n, dtype=torch.float16, device=dev)
        self.epilogue(self.acc, self.x_scale, self.w_scale, x_out, w_out, _bias_or_zeros(None, n, dev), y)
        return y.reshape(*(self.lead or (m,)), n)


def w4ax_linear(x_q, x_scale, w_q, w_scale, x_out=None, w_out=None, bias=None, out=None, out_dtype=None,
                into_residual=False, swiglu=False):
    """Y = quant_linear(...) on the GPU (the dispatch layer's entry point): the CUDA-core GEMV for
    M <= 4, the decode kernel (split-K + epilogue kernel where K is split) for M <= 64, the prefill kernel above.
    Writes `out` when given. x_scale float32 [M], w_scale float16 [n] (reshaped if [.., 1]).
    into_residual (Y only goes into a residual add): a split-K problem without outliers or bias
    returns its SplitKSums instead of running the epilogue kernel (SPLITK_INTO_NORM). swiglu (where
    swiglu_fusable): w_q is the MLP's gate_up [2h, K] and Y is silu(gate) * up, float16 [M, h]."""
    import torch

    m = x_q.shape[0]
    n, k = w_q.shape[0], w_q.shape[1] * 2
    rank = 0 if w_out is None else w_out.shape[1]
    out_dtype = out.dtype if out is not None else (out_dtype or torch.float16)
    dev = x_q.device
    if rank == 0:
        x_out, w_out = _no_outliers(m, n, dev)
    bias_t = _bias_or_zeros(bias, n, dev)
    xs, ws = x_scale.reshape(-1), w_scale.reshape(-1)
    # The prefill kernel loads both by 16-byte cp.async (gemm_rs's stage_scales): a view at an
    # unaligned offset is copied first.
    xs = xs.clone() if xs.data_ptr() % 16 else xs
    ws = ws.clone() if ws.data_ptr() % 16 else ws
    if swiglu:
        assert swiglu_fusable(m, n) and out_dtype == torch.float16, (m, n, out_dtype)
        y = out if out is not None else torch.empty(m, n // 2, dtype=torch.float16, device=dev)
        _build(_swiglu_spec(m, n, k, rank, bias is not None))(x_q, xs, w_q, ws, x_out, w_out, bias_t, y)
        return y
    kernels = kernels_for(m, n, k, rank, bias is not None, str(out_dtype).removeprefix("torch."))
    if len(kernels) == 2:
        acc = zeros("acc", m, n, torch.int32, dev)  # the epilogue leaves it zero again
        kernels[0](x_q, w_q, acc)
        if (into_residual and SPLITK_INTO_NORM and rank == 0 and bias is None and out is None
                and out_dtype == torch.float16):
            return SplitKSums(acc, xs, ws, kernels[1])  # no output tensor: the norm applies the epilogue
    y = out if out is not None else torch.empty(m, n, dtype=out_dtype, device=dev)
    if len(kernels) == 2:
        kernels[1](acc, xs, ws, x_out, w_out, bias_t, y)
    else:
        kernels[0](x_q, xs, w_q, ws, x_out, w_out, bias_t, y)
    return y
