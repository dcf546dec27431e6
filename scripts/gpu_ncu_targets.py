"""The kernels that bound quad-bench's missed targets, one launch each, for Nsight Compute
(scripts/gpu_ncu.sh): where their time goes by the hardware counters, not by timing variants.

    python scripts/gpu_ncu_targets.py            # builds every kernel first, then launches each once
    python scripts/gpu_ncu_targets.py --attention-only 64x4096   # decode attention (+ combine) alone

In launch order (Llama-3-8B shapes): 1 the gated 14336-wide Hadamard + int8 quantizer of the
down_proj input at 2048 tokens (~20% of copy: a sixth of a 16 x 2048 prefill); 2 the prefill GEMM
of gate_up at 2048 tokens (~920 of 1100 int8 TOPS); 3 decode attention at batch 32 x 1024 (~20% of
copy); 4 the split-K decode GEMM of gate_up at 32 tokens (~35% of copy); 5 the dp4a GEMV of gate_up
at one token; 6 the rmsnorm_quant of 2048 tokens. Only TileLang kernels are named main_kernel."""

import argparse

import torch

from kernels_tl import gemm_dispatch, kv_attention
from kernels_tl import reference as ref
from kernels_tl.hadamard_quant_dispatch import build_choice, kernel_choice
from kernels_tl.quantize import rmsnorm_quant

D, F, R = 4096, 14336, 64


def decode_attention_launch(b: int, ctx: int, dev: str = "cuda"):
    """Random int4 caches and Llama-3-8B heads at batch x context, the kernels built; returns the launch."""
    kvh = 8
    blocks = b * ctx // kv_attention.BLOCK_SIZE
    kd = torch.randint(0, 256, (blocks, kvh, 64, 64), device=dev, dtype=torch.uint8)
    km = torch.rand(blocks, kvh, 64, 2, device=dev).half()
    vd, vm = kd.clone(), km.clone()
    tables = torch.randperm(blocks, device=dev).view(b, -1).int()
    lens = torch.full((b,), ctx, device=dev, dtype=torch.int32)
    q = torch.randn(b, 32, 128, device=dev).half()
    splits = kv_attention.decode_splits(b, kvh, ctx)
    kv_attention.prebuild_decode(32, kvh, 128, [(b, splits)])
    return lambda: kv_attention.attention_decode_op(q, kd, km, vd, vm, tables, lens, splits)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attention-only", metavar="BxCTX", help="launch only decode attention at this batch x context")
    args = ap.parse_args()
    dev = "cuda"
    torch.manual_seed(0)
    if args.attention_only:
        launch = decode_attention_launch(*map(int, args.attention_only.split("x")))
        torch.cuda.synchronize()
        launch()
        torch.cuda.synchronize()
        print(f"launched: decode attention {args.attention_only}")
        return
    # Operands and kernels first (builds launch nothing; input setup launches only torch kernels).
    gate_up = torch.randn(2048, 2 * F, device=dev).half()
    had = build_choice(kernel_choice(2048, F, (28, 512), None, True), F, (28, 512), None, 8, 0.9, True)
    hq, hs = torch.empty(2048, F, device=dev, dtype=torch.int8), torch.empty(2048, device=dev)
    wq = ref.pack_int4(torch.randint(-8, 8, (2 * F, D), device=dev, dtype=torch.int8))
    ws = torch.rand(2 * F, device=dev).half() * 0.01
    xq = torch.randint(-8, 8, (2048, D), device=dev, dtype=torch.int8)
    xs = torch.rand(2048, device=dev) * 0.01
    gemm_dispatch.prebuild([(m, 2 * F, D, 0, False, "float16") for m in (1, 32, 2048)])
    attention = decode_attention_launch(32, 1024)
    h = torch.randn(2048, R + D, device=dev)
    norm = rmsnorm_quant(R + D, R, D, 4, 0.9, 1e-5, residual="float32")
    no, nq, ns = (torch.empty(2048, R, device=dev).half(), torch.empty(2048, D, device=dev, dtype=torch.int8),
                  torch.empty(2048, device=dev))
    torch.cuda.synchronize()

    had(gate_up, hq, hs)                                       # 1
    gemm_dispatch.w4ax_linear(xq, xs, wq, ws)                  # 2
    attention()                                                # 3 (+ combine)
    gemm_dispatch.w4ax_linear(xq[:32], xs[:32], wq, ws)        # 4 (+ epilogue where split)
    gemm_dispatch.w4ax_linear(xq[:1], xs[:1], wq, ws)          # 5
    norm(h, no, nq, ns)                                        # 6
    torch.cuda.synchronize()
    print("launched: hadamard_quant(gated) 2048, prefill GEMM 2048, decode attention b32, decode GEMM 32, "
          "GEMV 1, rmsnorm_quant 2048")


if __name__ == "__main__":
    main()
