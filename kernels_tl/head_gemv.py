"""The int8 lm_head's decode GEMV (TileLang, CUDA cores): `reference.head_w8a8` for M <= 4 tokens.

    logits[t, n] = float32(Σ_k q[t, k]·head_q[n, k]) · sx[t] · head_s[n]  +  Σ_c x_out[t, c]·head_out[n, c]

float32 out, where x_out float16 [M, r], q int8 [M, d] and sx are the final norm's split (one
rmsnorm_quant pass at 8 bits, clip 1: `ops.head_logits_int8`), head_q int8 [vocab, d] and head_s
float32 [vocab] reference.quantize_rows_int8's rows and scales, head_out float16 [vocab, r] the
outlier columns.

Why a kernel: at decode the head is a matrix-vector product over a 0.5 GB table (Llama-3-8B:
128256 x 4096 int8), bound by reading the table once. The torch._int_mm path (still used above
4 tokens) needs more than 16 rows, so it pads the tokens to 24 and runs as several launches (the
padding copy, the int8 GEMM, the fp16 outlier GEMM, the scaling), which measured slow under CUDA
graphs at batch 1. This kernel is one launch that streams the table once.

Shape of the kernel, as `gemv.w4ax_gemv` (the W4 GEMV) but on unpacked int8 weights: each warp owns
`rows_per_warp` table rows, each lane streams 16-byte chunks (16 int8 of a row, `unroll` chunks
per row in flight before the first use) and reuses every 16-byte activation chunk it loads across
its rows; a chunk is four dp4a against the matching 16 int8 of the activation. Lanes are reduced
with warp shuffles (int32: exact); lane 0 applies the scales in the reference's order with
round-to-nearest multiplies (no FMA contraction), so the integer part equals the reference bit for
bit, and adds the outlier product (each lane's share of the r channels, computed before the weight
stream so its latency hides under it). Only the outlier sum's order differs from the reference.

M is dynamic: one compiled kernel serves every M up to its `tokens` (1, 2 or 4).
"""

import functools

import tilelang
import tilelang.language as T

from kernels_tl.pdl import wait_for_producers

from kernels_tl.targets import SM90, TARGETS  # noqa: F401

GEMV_TOKENS = (1, 2, 4)  # compiled token widths; ops.head_w8a8 sends larger M to torch._int_mm

_DOT_SRC = r"""
// acc + <w, x> over 16 int8 values each: one 16-byte chunk of a table row and of the activation.
__device__ __forceinline__ int quad_dot_int8x16(const void* w_ptr, const void* x_ptr, int acc) {
  const int4 w = *reinterpret_cast<const int4*>(w_ptr);
  const int4 x = *reinterpret_cast<const int4*>(x_ptr);
  acc = __dp4a(w.x, x.x, acc);
  acc = __dp4a(w.y, x.y, acc);
  acc = __dp4a(w.z, x.z, acc);
  acc = __dp4a(w.w, x.w, acc);
  return acc;
}
"""


@functools.lru_cache(maxsize=None)
def head_gemv(n: int, k: int, rank: int, tokens: int = 1, rows_per_warp: int = 4, warps: int = 4,
              unroll: int = 2, target=None):
    """The head GEMV for a [n, k] int8 table with `rank` outlier columns, M <= `tokens`, called as
    kernel(x_out, x_q, x_scale, head_q, head_s, head_out, y):

    x_out float16 [M, rank] (the outlier channels; [1, 1], unread, when rank == 0), x_q int8 [M, k],
    x_scale float32 [M], head_q int8 [n, k], head_s float32 [n], head_out float16 [n, rank] ([1, 1],
    unread, when rank == 0), y float32 [M, n],
    written, not allocated (callers own it: CUDA graphs, tests that poison it). A grid of
    ceil(n / (rows_per_warp · warps)) blocks of `warps` warps; when the rows per block do not divide
    n, the last block's surplus rows read the table's last row and write nothing.
    """
    rows_per_block = rows_per_warp * warps
    chunks = k // 16  # 16-byte chunks per table row
    steps = -(-chunks // (32 * unroll))
    outlier_steps = -(-rank // 32)  # outlier channels per lane (lane-strided: coalesced)
    assert k % 16 == 0 and rank >= 0 and tokens >= 1
    assert 128 * 127 * k < 2 ** 31  # the int32 sums cannot overflow
    ragged = n % rows_per_block != 0
    wo_shape = (n, rank) if rank else (1, 1)

    def wrow(row0, rw):  # the table row a warp reads for its row rw (clamped in the last block)
        return T.min(row0 + rw, n - 1) if ragged else row0 + rw

    @tilelang.jit(target=TARGETS[target])
    def build():
        m = T.dynamic("m")

        @T.prim_func
        def main(
            XO: T.Tensor((m, rank) if rank else (1, 1), "float16"),
            XQ: T.Tensor((m, k), "int8"),
            XS: T.Tensor((m,), "float32"),
            WQ: T.Tensor((n, k), "int8"),
            WS: T.Tensor((n,), "float32"),
            WO: T.Tensor(wo_shape, "float16"),
            Y: T.Tensor((m, n), "float32"),
        ):
            with T.Kernel(T.ceildiv(n, rows_per_block), threads=warps * 32) as bx:
                wait_for_producers("head")
                tx = T.get_thread_binding()
                lane = tx % 32
                row0 = bx * rows_per_block + (tx // 32) * rows_per_warp
                w_loc = T.alloc_local((rows_per_warp * unroll * 16,), "int8")
                x_loc = T.alloc_local((tokens * unroll * 16,), "int8")
                acc = T.alloc_local((tokens * rows_per_warp,), "int32")
                extra = T.alloc_local((tokens * rows_per_warp,), "float32")
                T.import_source(_DOT_SRC)
                # This lane's share of the outlier product, before the weight stream (its latency
                # hides under it).
                for t in T.unroll(tokens):
                    for rw in T.unroll(rows_per_warp):
                        i = t * rows_per_warp + rw
                        acc[i] = 0
                        extra[i] = 0
                        for c in T.unroll(outlier_steps):
                            ch = c * 32 + lane
                            extra[i] = extra[i] + T.if_then_else(
                                t < m and ch < rank, T.Cast("float32", XO[t, ch]), T.float32(0)) * T.Cast(
                                "float32", T.if_then_else(ch < rank, WO[wrow(row0, rw), ch], T.float16(0)))
                for step in T.unroll(steps):
                    # All loads of a step first (independent, in flight together), then the math.
                    for u in T.unroll(unroll):
                        chunk = (step * unroll + u) * 32 + lane
                        for rw in T.unroll(rows_per_warp):
                            for v in T.vectorized(16):
                                w_loc[(rw * unroll + u) * 16 + v] = T.if_then_else(
                                    chunk < chunks, WQ[wrow(row0, rw), chunk * 16 + v], T.int8(0))
                        for t in T.unroll(tokens):
                            for v in T.vectorized(16):
                                x_loc[(t * unroll + u) * 16 + v] = T.if_then_else(
                                    chunk < chunks and t < m, XQ[t, chunk * 16 + v], T.int8(0))
                    for u in T.unroll(unroll):
                        for rw in T.unroll(rows_per_warp):
                            for t in T.unroll(tokens):
                                acc[t * rows_per_warp + rw] = T.call_extern(
                                    "int32", "quad_dot_int8x16", T.address_of(w_loc[(rw * unroll + u) * 16]),
                                    T.address_of(x_loc[(t * unroll + u) * 16]), acc[t * rows_per_warp + rw])
                for t in T.unroll(tokens):
                    for rw in T.unroll(rows_per_warp):
                        i = t * rows_per_warp + rw
                        # float32(ints) · sx · head_s in the reference's order, each product rounded
                        # (__fmul_rn: never fused into an FMA with the outlier add).
                        y = T.call_extern("float32", "__fmul_rn", T.call_extern(
                            "float32", "__fmul_rn", T.Cast("float32", T.warp_reduce_sum(acc[i])),
                            T.if_then_else(t < m, XS[t], T.float32(0))), WS[wrow(row0, rw)])
                        if rank > 0:
                            y = T.call_extern("float32", "__fadd_rn", T.warp_reduce_sum(extra[i]), y)
                        if ragged:
                            if lane == 0 and t < m and row0 + rw < n:
                                Y[t, row0 + rw] = y
                        else:
                            if lane == 0 and t < m:
                                Y[t, row0 + rw] = y

        return main

    return build()


def prebuild(heads, token_counts=GEMV_TOKENS, workers: int = 16) -> None:
    """Compile the GEMV of every (n, k, rank) head at every token width in parallel (TileLang compiles
    through nvcc subprocesses, so threads overlap), instead of one at a time on first use."""
    from concurrent.futures import ThreadPoolExecutor

    jobs = [(n, k, rank, t) for n, k, rank in sorted(set(heads)) for t in sorted(set(token_counts))]
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda job: head_gemv(*job), jobs))


_dummies: dict = {}


def head_w8a8_op(x_out, x_q, x_scale, head_out, head_q, head_s, out=None):
    """reference.head_w8a8 on the GPU for M <= 4 tokens (x_out [M, r], x_q int8 [M, d], x_scale [M]
    or [M, 1]): float32 [M, vocab]; writes `out` when given."""
    import torch

    m, k = x_q.shape
    n = head_q.shape[0]
    rank = head_out.shape[-1]
    assert head_q.shape[1] == k and x_out.shape == (m, rank) and 0 < m <= GEMV_TOKENS[-1], (x_out.shape, x_q.shape)
    tokens = next(t for t in GEMV_TOKENS if t >= m)
    if rank:
        x_out, w_out = x_out.half().contiguous(), head_out.half().contiguous()
    else:  # not read: tensors of the declared [1, 1] (kept, so no allocation inside a graph capture)
        w_out = _dummies.get(x_q.device)
        if w_out is None:
            w_out = _dummies[x_q.device] = torch.zeros(1, 1, dtype=torch.float16, device=x_q.device)
        x_out = w_out
    y = out if out is not None else torch.empty(m, n, dtype=torch.float32, device=x_q.device)
    head_gemv(n, k, rank, tokens)(x_out, x_q.contiguous(), x_scale.reshape(m).float(), head_q.contiguous(),
                                  head_s.float().contiguous(), w_out, y)
    return y
