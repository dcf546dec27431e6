"""Hadamard + quantize kernel sweeps at Llama-3-8B shapes (bench/sweeps.py runs them): the one-block
kernel's launch shapes and the cluster variant per token count, the streaming kernel and its
tensor-core variant against the dispatch's choice, and the two-pass kernel of square rows. Each
variant's codes are compared with the one-block default's on the same inputs, timed in the same run.
"""

from __future__ import annotations

import torch
from kernels import bench, bench_graph, build_all

HADAMARD_TUNINGS = [dict()] + [dict(threads=t, cols_per_thread=c, max_radix=r) for t in (128, 256, 512, 1024)
                                for c in (1, 2, 4, 8) for r in (3, 4)]
# The cluster variant (kernels_tl.hadamard_quant_cluster), timed at the small token counts it is for.
CLUSTER_TUNINGS = [dict(cluster=c, threads=t) for c in (2, 4, 8) for t in (128, 256, 512)]
CLUSTER_MAX_M = 64
# At thousands of tokens only the shapes that keep 3 blocks a SM (72 registers at 256 threads): the
# one-block kernel holds 3 rows a SM there (57 KB of float32 row each), a 2-block cluster half a row
# a block (Nsight Compute at 2048 tokens: 15% of DRAM bandwidth, 35% occupancy).
CLUSTER_LARGE_M = [dict(cluster=c, threads=256) for c in (2, 4)]


def _measured_quantizer(row: dict, kern, x, want_q, want_s, moved: int, graph: bool):
    """One Hadamard quantizer variant: kern(x, q, s) on poisoned outputs, timed (from a CUDA graph
    with `graph`); row gets us, GB/s on `moved` bytes and the fraction of codes equal to want_q.
    Returns the scales it wrote for the caller's comparison, or None after recording a build error
    (kern is the exception) or a failed launch in the row: reported, not fatal."""
    q, sc = torch.full_like(want_q, 0x55), torch.full_like(want_s, float("nan"))
    try:
        if isinstance(kern, Exception):
            raise kern
        kern(x, q, sc)
        t = bench_graph([lambda: kern(x, q, sc)]) if graph else bench(lambda: kern(x, q, sc))
    except Exception as e:
        row["error"] = str(e).splitlines()[0][:200]
        return None
    row.update(us=1e3 * t, gbps=moved / t / 1e6, codes_equal=(q == want_q).float().mean().item())
    return sc


def sweep_hadamard(n: int, gated: bool, ms=(1, 4, 16, 32, 64, 2048)) -> list[dict]:
    """Launch shapes of the Hadamard+quantize kernel at one width, per token count M: the decode
    step runs it at M = 1 as a single thread block (10 µs a call for the down_proj input on an
    H200), so its best shape at small M is not that at M = 2048. Each variant's codes are compared
    with the default's (same inputs), and timed back to back in a CUDA graph for M <= 64 (as the
    decode step runs), with do_bench above. Up to CLUSTER_MAX_M tokens the cluster variant
    (the row split over a thread-block cluster) is timed too; gated, the default and cluster
    shapes again with fast_silu (approximate exp / reciprocal in silu)."""
    from kernels_tl.hadamard import hadamard_factors
    from kernels_tl.hadamard_quant import hadamard_quant
    from kernels_tl.hadamard_quant_cluster import hadamard_quant_cluster

    factors = tuple(hadamard_factors(n))

    def variant(t: dict, fast: bool = False):
        """(key, build thunk) of a tuning: the one-block kernel's, or the cluster kernel's where t
        names a cluster size; fast: its build with fast_silu."""
        cluster = "cluster" in t
        key = (("kernel", "cluster"),) * cluster + (("fast_silu", True),) * fast + tuple(sorted(t.items()))
        extra = {"fast_silu": True} if fast else {}
        if cluster:
            return key, lambda: hadamard_quant_cluster(n, factors, 8, 0.9, gated=gated, **t, **extra)
        return key, lambda: hadamard_quant(n, factors, None, 8, 0.9, gated=gated, **t, **extra)

    keys = [variant(t)[0] for t in HADAMARD_TUNINGS]
    cluster_keys = [variant(t)[0] for t in CLUSTER_TUNINGS]
    thunks = dict(variant(t) for t in HADAMARD_TUNINGS + CLUSTER_TUNINGS)
    if gated:  # silu from the approximate exp / reciprocal, in the default and the cluster shapes
        thunks.update(variant(t, fast=True) for t in [dict()] + CLUSTER_TUNINGS + CLUSTER_LARGE_M)
    built = build_all(thunks)
    rows = []
    for m in ms:
        x = torch.randn(m, 2 * n if gated else n, device="cuda").half()
        want_q, want_s = torch.empty(m, n, device="cuda", dtype=torch.int8), torch.empty(m, device="cuda")
        built[keys[0]](x, want_q, want_s)
        moved = x.numel() * 2 + m * n + m * 4
        large = [variant(t, fast)[0] for fast in (False, True) for t in CLUSTER_LARGE_M]
        fast_block = [k for k in built if ("fast_silu", True) in k and ("kernel", "cluster") not in k]
        fast_cluster = [k for k in built if ("fast_silu", True) in k and ("kernel", "cluster") in k]
        for key in keys + fast_block + (cluster_keys + fast_cluster if m <= CLUSTER_MAX_M
                                        else [k for k in large if k in built]):
            row = {"n": n, "gated": gated, "m": m, "tuning": dict(key)}
            sc = _measured_quantizer(row, built[key], x, want_q, want_s, moved, graph=m <= 64)
            if sc is not None:
                row["scale_max_rel"] = ((sc - want_s).abs() / want_s.abs()).max().item()
            rows.append(row)
        best = min((r for r in rows if r["m"] == m and "us" in r), key=lambda r: r["us"], default=None)
        default = next((r for r in rows if r["m"] == m and r["tuning"] == {} and "us" in r), None)
        if best and default:
            print(f"  sweep hadamard n={n} gated={gated} M={m}: default {default['us']:.1f} us, best {best['us']:.1f} us "
                  f"{best['tuning']} (codes equal {best['codes_equal']:.4f})", flush=True)
    return rows


STREAM_MS = (128, 256, 512, 1024, 2048, 8192)


def sweep_hadamard_stream(n: int, gated: bool, ms=STREAM_MS) -> list[dict]:
    """The streaming Hadamard+quantize kernel (kernels_tl.hadamard_quant_stream: persistent blocks,
    the next row copied with cp.async under the current one) at 1 .. blocks_per_sm blocks a SM,
    its tensor-core variant (kernels_tl.hadamard_quant_mma) where the row fits it, the two-pass
    kernel of square plain rows (kernels_tl.hadamard_quant_square) where it fits, beside what the
    dispatch runs and the one-block default, per token count M. Each
    variant's codes are compared with the default's (gated rows: all with fast_silu, as prefills
    run them); GB/s counts the row read and the codes and scales written."""
    from kernels_tl import hadamard_quant_dispatch as hq
    from kernels_tl.hadamard import hadamard_factors
    from kernels_tl.hadamard_quant import hadamard_quant
    from kernels_tl.hadamard_quant_mma import mma_fits
    from kernels_tl.hadamard_quant_square import hadamard_quant_square, square_fits
    from kernels_tl.hadamard_quant_stream import blocks_per_sm, hadamard_quant_stream

    factors = tuple(hadamard_factors(n))
    fast = gated and hq.FAST_SILU
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    thunks = {("default",): lambda: hadamard_quant(n, factors, None, 8, 0.9, gated=gated, fast_silu=fast)}
    for b in range(1, blocks_per_sm(n, factors, None, gated) + 1):
        thunks[("stream", b)] = (lambda b=b: hadamard_quant_stream(n, factors, None, 8, 0.9, b * sms, gated=gated,
                                                                    fast_silu=fast))
    if mma_fits(n, factors, None, gated):  # the dense factor on the tensor cores, at every M
        thunks[("mma",)] = lambda: hq.build_choice(("mma",), n, factors, None, 8, 0.9, gated)
    if square_fits(n, factors, None, gated):  # two register passes over a square row, at every M
        thunks[("square",)] = lambda: hq.build_choice(("square",), n, factors, None, 8, 0.9, gated)
        thunks[("square", "codes via shared")] = lambda: hadamard_quant_square(n, 8, 0.9, stage_codes=True)
        for rows in (1, 4):
            thunks[("square", f"{rows} rows a block")] = lambda rows=rows: hadamard_quant_square(n, 8, 0.9, rows=rows)
    for m in ms:
        choice = hq.kernel_choice(m, n, factors, None, gated)
        thunks[("dispatch",) + choice] = lambda choice=choice: hq.build_choice(choice, n, factors, None, 8, 0.9, gated)
    built = build_all(thunks)
    rows = []
    for m in ms:
        x = torch.randn(m, 2 * n if gated else n, device="cuda").half()
        want_q, want_s = torch.empty(m, n, device="cuda", dtype=torch.int8), torch.empty(m, device="cuda")
        built[("default",)](x, want_q, want_s)
        moved = x.numel() * 2 + m * n + m * 4
        choice = ("dispatch",) + hq.kernel_choice(m, n, factors, None, gated)
        for key in [choice, ("default",)] + [k for k in built if k[0] in ("stream", "mma", "square")]:
            row = {"n": n, "gated": gated, "m": m, "kernel": list(key)}
            sc = _measured_quantizer(row, built[key], x, want_q, want_s, moved, graph=False)
            rows.append(row)
            if sc is None:
                continue
            row["scales_equal"] = bool(torch.equal(sc, want_s))
            print(f"  stream sweep n={n} gated={gated} M={m} {key}: {row['us']:.1f} us, {row['gbps']:.0f} GB/s, "
                  f"codes equal {row['codes_equal']:.6f}", flush=True)
    return rows


NORM_THREADS = (None, 128, 256, 512, 1024)


def sweep_norm_threads(width: int = 64 + 4096, rank: int = 64, ms=(1, 4, 32, 2048)) -> list[dict]:
    """The fused norm (kernels_tl.quantize.rmsnorm_quant) by threads a block, in the modes the
    decode step runs (float32 residual read, residual add, split-K sums added), per token count M:
    one block a token, so at decode sizes a row's latency is the kernel's time and more threads
    shorten each thread's serial part. Timed back to back from a CUDA graph up to 64 tokens, each
    call on its own buffers; codes and scales compared with the width rule's (None)."""
    from kernels_tl.quantize import rmsnorm_quant

    d = width - rank
    modes = ("float32", "add", "splitk")
    built = build_all({(mode, t): (lambda mode=mode, t=t: rmsnorm_quant(width, rank, d, 4, 0.9, 1e-5, threads=t,
                                                                           residual=mode))
                       for mode in modes for t in NORM_THREADS})
    rows = []
    for m in ms:
        copies = max(1, min(16, (64 << 20) // (m * width * 8)))
        for mode in modes:
            def operands_of(seed: int):
                g = torch.Generator(device="cuda").manual_seed(seed)
                h = torch.randn(m, width, device="cuda", generator=g) * 3
                outs = (torch.full((m, max(rank, 16)), float("nan"), device="cuda", dtype=torch.float16),
                        torch.full((m, d), 0x55, device="cuda", dtype=torch.int8),
                        torch.full((m,), float("nan"), device="cuda"))
                if mode == "float32":
                    return (h,) + outs
                if mode == "add":
                    return (h, torch.randn(m, width, device="cuda", generator=g).half()) + outs
                acc = torch.randint(-2**20, 2**20, (m, width), device="cuda", dtype=torch.int32, generator=g)
                sx, ws = torch.rand(m, device="cuda", generator=g) * 1e-3, torch.rand(width, device="cuda", generator=g).half()
                return (h, acc, sx, ws) + outs
            want = None
            for t in NORM_THREADS:
                row = {"width": width, "m": m, "mode": mode, "threads": t}
                rows.append(row)
                kern = built[(mode, t)]
                if isinstance(kern, Exception):
                    row["error"] = str(kern).splitlines()[0][:200]
                    continue
                check = operands_of(0)  # same inputs for every thread count: outputs compared
                kern(*check)
                got = [x.clone() for x in check[-3:]]
                if want is None:
                    want = got
                row["codes_equal"] = (got[1] == want[1]).float().mean().item()
                row["scales_equal"] = bool(torch.equal(got[2], want[2]))
                sets = [operands_of(1 + i) for i in range(copies)]
                fns = [lambda a=a: kern(*a) for a in sets]
                row["us"] = 1e3 * (bench_graph(fns) if m <= 64 else bench(fns[0]))
                print(f"  norm sweep mode={mode} M={m} threads={t}: {row['us']:.2f} us, codes equal "
                      f"{row['codes_equal']:.6f}, scales equal {row['scales_equal']}", flush=True)
    return rows
