"""Attention benchmark: the paged int4 KV cache kernels against torch SDPA on dense fp16 K / V
(flash backend where it applies) and flash-attn where it imports, timed in the same run. Decode:
one query token per sequence over its context. Prefill: one sequence's causal attention over its
own tokens, read from the int4 cache (the cache dequantized once then flash attention, and the
paged prefill kernel `attention_prefill`), against SDPA with is_causal.

    python bench/attention.py --out bench/results/attention.json [--quick]
        [--prefill-only | --decode-only | --sweep-splits] [--variants rf,tile,...]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from triton.testing import do_bench

from kernels_tl import kv_attention as kv

MODELS = {"llama-3-8b": (32, 8, 128), "qwen2.5-7b": (28, 4, 128), "smollm2": (9, 3, 64)}
BATCHES = [1, 16, 64]
CONTEXTS = [1024, 4096, 16384, 32768]
PREFILL_TOKENS = [2048, 8192]


VARIANTS = (("tile", dict(kernel="tile")), ("rf", dict(kernel="rf")),
            *((f"rf_s{n}", dict(kernel="rf", rf_stages=n)) for n in (1, 2, 3, 4)),
            ("rf_lazy8", dict(kernel="rf", rf_slack=8.0)),
            ("prefetch", dict(kernel="tile", prefetch=True, min_blocks=1)),
            ("prefetch_mb4", dict(kernel="tile", prefetch=True, min_blocks=4)),
            ("prefetch_mb5", dict(kernel="tile", prefetch=True, min_blocks=5)),
            ("plain", dict(kernel="tile", prefetch=False)))


def bench(fn) -> float:
    return do_bench(fn, warmup=10, rep=50)


def decode_inputs(model: str, batch: int, ctx: int, width: int):
    """(q, kd, km, vd, vm, tables, lens): random int4 caches of `width` blocks a sequence, block
    tables over a shuffled pool, every sequence `ctx` tokens long."""
    heads, kv_heads, dim = MODELS[model]
    num_blocks = batch * width
    kd = torch.randint(0, 256, (num_blocks, kv_heads, kv.BLOCK_SIZE, dim // 2), device="cuda", dtype=torch.uint8)
    km = torch.rand(num_blocks, kv_heads, kv.BLOCK_SIZE, 2, device="cuda").half()
    tables = torch.randperm(num_blocks, device="cuda").view(batch, width).int()
    lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
    q = torch.randn(batch, heads, dim, device="cuda").half()
    return q, kd, km, kd.clone(), km.clone(), tables, lens


def one(model: str, batch: int, ctx: int, variants=VARIANTS) -> dict:
    heads, kv_heads, dim = MODELS[model]
    q, kd, km, vd, vm, tables, lens = decode_inputs(model, batch, ctx, ctx // kv.BLOCK_SIZE)
    splits = kv.decode_splits(batch, kv_heads, ctx)
    out = torch.empty_like(q)
    kv.attention_decode_op(q, kd, km, vd, vm, tables, lens, splits, out=out)
    t_ours = bench(lambda: kv.attention_decode_op(q, kd, km, vd, vm, tables, lens, splits, out=out))
    # Variants, each with its error against the default: the two decode kernels
    # (kv_attention.decode_kernel); the register-fragment kernel's pipeline depths and rescale
    # slack; the tile kernel's loops: register prefetch (uncapped: 160 registers, and capped at 4 / 5
    # blocks a SM: 126 / 96 registers, see kv_attention.decode_loop) and the plain one-stage loop
    # (its pipelined num_stages 2 loop was 1.3-4.4x slower than one stage on an H200 and is not
    # timed again here).
    piped = {}
    for name, kwargs in variants:
        try:
            out2 = torch.full_like(out, float("nan"))
            kv.attention_decode_op(q, kd, km, vd, vm, tables, lens, splits, out=out2, **kwargs)
            piped[f"{name}_ms"] = bench(
                lambda kw=kwargs: kv.attention_decode_op(q, kd, km, vd, vm, tables, lens, splits, out=out2, **kw))
            piped[f"{name}_rel_err"] = float((out2.float() - out.float()).norm() / out.float().norm())
        except Exception as e:  # a variant that does not build or run is reported, not fatal
            piped[f"{name}_error"] = str(e).splitlines()[0][:200]
    del kd, km, vd, vm
    k16 = torch.randn(batch, kv_heads, ctx, dim, device="cuda").half()
    v16 = torch.randn(batch, kv_heads, ctx, dim, device="cuda").half()
    q4 = q.unsqueeze(2)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    t_sdpa = bench(lambda: sdpa(q4, k16, v16, enable_gqa=True))
    row = {"model": model, "batch": batch, "context": ctx, "splits": splits, "ms": t_ours, "sdpa_fp16_ms": t_sdpa,
           **piped}
    try:
        from flash_attn import flash_attn_with_kvcache
        kf, vf, qf = k16.transpose(1, 2).contiguous(), v16.transpose(1, 2).contiguous(), q.unsqueeze(1)
        row["flash_attn_fp16_ms"] = bench(lambda: flash_attn_with_kvcache(qf, kf, vf))
    except ImportError:
        pass
    int4_bytes = 2 * batch * ctx * kv_heads * (dim // 2 + 4)
    row.update(gbps=int4_bytes / t_ours / 1e6, speedup_vs_sdpa=t_sdpa / t_ours,
               fp16_bytes_per_int4_byte=(2 * dim) / (dim // 2 + 4))
    return row


def sweep_splits(model: str, batch: int, ctx: int, capacity: int = 8192) -> list[dict]:
    """Decode attention at every context split count, as the engine runs it: block tables as wide as
    a `capacity`-token sequence (a CUDA graph's split count comes from the table's capacity; the
    kernel divides each sequence's own blocks among the splits, so a context of fewer blocks than
    splits leaves some empty), lengths `ctx`. Each split count's output against decode_splits'
    own, and the time of attention plus combine."""
    kv_heads = MODELS[model][1]
    q, kd, km, vd, vm, tables, lens = decode_inputs(model, batch, ctx, capacity // kv.BLOCK_SIZE)
    default = kv.decode_splits(batch, kv_heads, capacity)
    want = kv.attention_decode_op(q, kd, km, vd, vm, tables, lens, default)
    rows = []
    for splits in (1, 2, 4, 8, 16, 32):
        if capacity // (splits * kv.BLOCK_SIZE) < 1:
            continue
        row = {"model": model, "batch": batch, "context": ctx, "capacity": capacity, "splits": splits,
               "default": splits == default}
        try:
            out = torch.full_like(want, float("nan"))
            kv.attention_decode_op(q, kd, km, vd, vm, tables, lens, splits, out=out)
            row["rel_err"] = float((out.float() - want.float()).norm() / want.float().norm())
            row["ms"] = bench(lambda s=splits: kv.attention_decode_op(q, kd, km, vd, vm, tables, lens, s, out=out))
        except Exception as e:  # reported, not fatal
            row["error"] = str(e).splitlines()[0][:200]
        rows.append(row)
        print(f"  splits {row}", flush=True)
    return rows


def one_prefill(model: str, tokens: int) -> dict:
    """One sequence's causal prefill read back from the int4 cache: the engine's path (the cache
    gathered and dequantized once, then flash attention: attention_prefill_sdpa_op, `ms`) and the
    paged int4 prefill kernel with its loop variants, each with its error against the engine's path."""
    from kernels_tl.attention_prefill import attention_prefill_op, attention_prefill_sdpa_op

    heads, kv_heads, dim = MODELS[model]
    width = tokens // kv.BLOCK_SIZE
    kd = torch.randint(0, 256, (width, kv_heads, kv.BLOCK_SIZE, dim // 2), device="cuda", dtype=torch.uint8)
    km = torch.rand(width, kv_heads, kv.BLOCK_SIZE, 2, device="cuda").half()
    vd, vm = kd.clone(), km.clone()
    tables = torch.randperm(width, device="cuda").view(1, width).int()
    lens = torch.full((1,), tokens, device="cuda", dtype=torch.int32)
    q = torch.randn(tokens, heads, dim, device="cuda").half()
    ref_out = attention_prefill_sdpa_op(q, kd, km, vd, vm, tables, [tokens], [tokens])
    t_ours = bench(lambda: attention_prefill_sdpa_op(q, kd, km, vd, vm, tables, [tokens], [tokens]))
    piped = {}
    # The paged kernel: its default loop, pipelined, register prefetch, 128-row programs (256
    # threads) without and with it.
    variants = {"kernel": {}, "kernel_stages2": dict(num_stages=2), "kernel_prefetch": dict(prefetch=True),
                "kernel_rows128": dict(rows=128), "kernel_rows128_prefetch": dict(rows=128, prefetch=True)}
    for name, kw in variants.items():
        try:
            out2 = attention_prefill_op(q, kd, km, vd, vm, tables, lens, [tokens], **kw)
            piped[f"{name}_ms"] = bench(lambda kw=kw: attention_prefill_op(q, kd, km, vd, vm, tables, lens, [tokens], **kw))
            piped[f"{name}_rel_err"] = float((out2.float() - ref_out.float()).norm() / ref_out.float().norm())
        except Exception as e:  # reported, not fatal
            piped[f"{name}_error"] = str(e).splitlines()[0][:200]
    q16 = q.transpose(0, 1).unsqueeze(0)
    k16 = torch.randn(1, kv_heads, tokens, dim, device="cuda").half()
    v16 = torch.randn(1, kv_heads, tokens, dim, device="cuda").half()
    sdpa = torch.nn.functional.scaled_dot_product_attention
    t_sdpa = bench(lambda: sdpa(q16, k16, v16, is_causal=True, enable_gqa=True))
    flops = 2 * 2 * heads * dim * tokens * tokens / 2  # QKᵀ and PV over the causal half
    return {"model": model, "tokens": tokens, "path": "gather + dequantize + SDPA", "ms": t_ours,
            "sdpa_fp16_ms": t_sdpa, "tflops": flops / t_ours / 1e9, "speedup_vs_sdpa": t_sdpa / t_ours, **piped}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="Llama-3-8B shapes only")
    ap.add_argument("--prefill-only", action="store_true", help="skip the decode rows")
    ap.add_argument("--decode-only", action="store_true", help="skip the prefill rows")
    ap.add_argument("--variants", default=",".join(name for name, _ in VARIANTS),
                    help="decode variants timed beside the default (comma-separated; default: all)")
    ap.add_argument("--sweep-splits", action="store_true",
                    help="only the decode split-count sweep (Llama-3-8B, batch 1 / 16 / 32, contexts 1k / 4k, "
                         "engine-like table widths; then batch 16 / 64 at 4k-32k)")
    args = ap.parse_args()
    variants = [(name, kw) for name, kw in VARIANTS if name in args.variants.split(",")]
    copy = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    copy_gbps = 2 * copy.numel() / bench(lambda: copy.clone()) / 1e6
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "tilelang": __import__("tilelang").__version__, "python": platform.python_version(),
              "date": time.strftime("%Y-%m-%d"), "copy_gbps": copy_gbps, "decode": [], "prefill": []}

    def save():  # after every row: a run cut short by a time limit keeps what it measured
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    if args.sweep_splits:
        result["splits"] = []
        # Capacity 2112: quad-bench's decode plan (max_model_len 2049, 33 blocks); 8192: a longer one.
        for batch in (1, 16, 32):
            for ctx, capacity in ((1024, 2112), (1024, 8192), (4096, 8192)):
                result["splits"] += sweep_splits("llama-3-8b", batch, ctx, capacity)
                save()
        # Issue 4's decode shapes (batch >= 16, context >= 4k), tables as long as the context: there
        # the default's ~2 programs a SM each walk hundreds of blocks one after another.
        for batch, ctx in ((16, 4096), (16, 32768), (64, 4096), (64, 16384)):
            result["splits"] += sweep_splits("llama-3-8b", batch, ctx, ctx)
            save()
        return

    for model in (["llama-3-8b"] if args.quick else list(MODELS)):
        for batch in ([] if args.prefill_only else BATCHES):
            for ctx in CONTEXTS:
                if batch * ctx > 64 * 32768:
                    continue
                row = one(model, batch, ctx, variants)
                result["decode"].append(row)
                print(f"{model:11s} B={batch:3d} ctx={ctx:6d} splits={row['splits']:2d}: {row['ms'] * 1e3:8.1f} us "
                      f"{row['gbps']:6.0f} GB/s ({row['gbps'] / copy_gbps:4.0%} of copy)  SDPA fp16 "
                      f"{row['sdpa_fp16_ms'] * 1e3:8.1f} us  x{row['speedup_vs_sdpa']:.2f}" + "".join(
                          f" | {name} {row[f'{name}_ms'] * 1e3:.1f} us (x{row['sdpa_fp16_ms'] / row[f'{name}_ms']:.2f},"
                          f" err {row[f'{name}_rel_err']:.1e})"
                          for name, _ in variants if f"{name}_ms" in row) + "".join(
                          f" | {name} failed: {row[f'{name}_error']}" for name, _ in variants
                          if f"{name}_error" in row), flush=True)
                torch.cuda.empty_cache()
                save()
        for tokens in ([] if args.decode_only else PREFILL_TOKENS):
            row = one_prefill(model, tokens)
            result["prefill"].append(row)
            print(f"{model:11s} prefill {tokens:5d} tokens: {row['ms'] * 1e3:8.1f} us {row['tflops']:6.0f} TFLOPS  "
                  f"SDPA fp16 {row['sdpa_fp16_ms'] * 1e3:8.1f} us  x{row['speedup_vs_sdpa']:.2f}" + "".join(
                      f" | {k[:-3]} {v * 1e3:.1f} us (err {row[k[:-3] + '_rel_err']:.1e})"
                      for k, v in row.items() if k.startswith("kernel") and k.endswith("_ms")), flush=True)
            torch.cuda.empty_cache()
            save()


if __name__ == "__main__":
    main()
