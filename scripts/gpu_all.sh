#!/usr/bin/env bash
# Every GPU test and kernel benchmark, logs under $1 (the device's $OUT), in parts that each fit
# one device call (10 minutes):
#   source .gpu/activate.sh && export PYTHONPATH=$PWD:$PWD/tests:$PYTHONPATH && bash scripts/gpu_all.sh $OUT PART
# PART: gemm (GEMM tests, every shape and M), gemm-decode (the same at the decode kernels' token
# counts 9 / 17 / 40 only), gemm-decode-blocks (gemm-decode with the decode kernels built for 2 and 3
# blocks a SM), gemm-pipelined (the GEMM tests at 9 / 17 / 40 / 2053 tokens with the pipelined
# kernels the dispatch no longer picks there: QUAD_PREFILL_GEMM / QUAD_DECODE_GEMM=pipelined), gemm-ws (the
# GEMM tests at 2053 tokens with the producer-unpack prefill kernel, QUAD_PREFILL_GEMM=ws),
# prefill-sdpa (flash attention over the cache dequantized once, the default for
# prefills with a cached prefix: its tests, the engine's chunked prefill with it and with the paged
# kernel, then the prefill rows of bench/attention.py), decode (gemm-decode, the decode-attention
# tests and the int8 lm_head tests at once: every kernel a decode step runs), quantize (quantizer
# tests), quantize-clusters (the cluster Hadamard quantizers, with the 2-block clusters long
# prefills take, and the fast-silu variants), kv (KV-cache tests), rope (the fused RoPE + Hadamard + KV store: its tests, then
# the engine's logits with it and without), engine (engine tests: scripts/gpu_engine.sh check),
# attention-rf (the register-fragment decode attention: its tests, both pipelines and the lazy
# rescale, then the decode rows of bench/attention.py with those and the tile kernel beside the default),
# bench-kernels, bench-attention, sweep-splits (decode attention at every split count, engine-like
# table widths), sweep-decode (split-K variants of the decode GEMM at 16 and 32 tokens),
# gemm-fill (the decode GEMM tests at 9 / 17 / 40 tokens with QUAD_DECODE_GEMM_FILL=2, then the
# GEMM rows of bench/kernels.py at 16 / 32 / 64 tokens with it and without),
# sweep-decode-ws (the producer-unpack decode GEMM's tiles beside the dispatch's kernel: qkv and
# gate_up at 16 / 32 / 64 tokens),
# swiglu (QUAD_FUSED_SWIGLU: the gate_up GEMM's SwiGLU epilogue, its GEMM tests, the engine's prefill
# logits with it and without, then the engine prefill A/B),
# stream (the streaming Hadamard quantizer's GPU tests, the dispatch test, then the engine prefill
# A/B against the one-block default), mma (the same for its tensor-core variant, the engine A/B
# against the scalar streaming kernel), square (the two-pass quantizer of square rows, QUAD_HADAMARD_SQUARE_MIN:
# its GPU tests, its sweep beside the one-block kernel at 1-8192 tokens, the engine A/B with it at every
# token count: prefill 1 / 16 x 2048, decode b1 / b32),
# norm (the norm + quantize at both block sizes, the width rule's and the decode steps' 512
# threads: its GPU tests, then the engine A/B against QUAD_NORM_DECODE_THREADS=0 in two rounds),
# l2-prefetch (the next GEMM's weights asked for in L2 under the small kernels before it,
# QUAD_L2_PREFETCH_MB: its GPU tests, the engine's logits and graphs with it, then the engine A/B at
# 16 / 32 MiB at every site, the norms' sites alone and the o / down sites alone, decode only),
# sweep-hadamard-stream,
# sweep-hadamard, sweep-hadamard-gated (the gated 14336-wide quantizer alone, with its fast-silu
# variants), sweep-rs-panel (the prefill GEMM's blocks in panels of token tiles, and gate_up's time
# against K). Each benchmark writes its JSON after every section, so a part cut short keeps
# what it measured.
set -u
out=${1:?usage: scripts/gpu_all.sh OUT_DIR PART}
part=${2:?PART: norm | l2-prefetch | gemm | gemm-decode | gemm-decode-blocks | gemm-fill | gemm-pipelined | gemm-ws | prefill-sdpa | decode | quantize | quantize-clusters | kv | rope | engine | attention-rf | swiglu | stream | square | bench-kernels | bench-attention | sweep-splits | sweep-decode | sweep-decode-ws | sweep-hadamard | sweep-hadamard-gated | sweep-hadamard-stream | sweep-rs-panel}
mkdir -p "$out"
quiet() { grep -v "INFO\|WARNING\|AnnotateWarpGroup" ; }
case "$part" in
  gemm) timeout 560 python3 scripts/gpu_gemm_check.py -q 2>&1 | quiet > "$out/gemm_tests.log"
        tail -n 3 "$out/gemm_tests.log" ;;
  gemm-decode) QUAD_GEMM_TEST_MS=9,17,40 timeout 560 python3 scripts/gpu_gemm_check.py -q 2>&1 | quiet \
                 > "$out/gemm_decode_tests.log"
               tail -n 3 "$out/gemm_decode_tests.log" ;;
  gemm-fill) QUAD_DECODE_GEMM_FILL=2 QUAD_GEMM_TEST_MS=9,17,40 timeout 300 python3 scripts/gpu_gemm_check.py -q 2>&1 \
               | quiet > "$out/gemm_fill_tests.log"
             tail -n 3 "$out/gemm_fill_tests.log"
             for fill in 1 2; do
               QUAD_DECODE_GEMM_FILL=$fill timeout 130 python3 bench/kernels.py --quick --gemm-ms 16,32,64 \
                 --out "$out/kernels_fill$fill.json" 2>&1 | quiet > "$out/kernels_fill$fill.log"
               tail -n 12 "$out/kernels_fill$fill.log" | cut -c1-200
             done ;;
  gemm-decode-blocks)  # the decode kernels built for 2 and 3 blocks a SM (QUAD_DECODE_GEMM_BLOCKS), in parallel
    for b in 2 3; do
      QUAD_DECODE_GEMM_BLOCKS=$b QUAD_GEMM_TEST_MS=9,17,40 timeout 540 python3 scripts/gpu_gemm_check.py -q 2>&1 | quiet \
        > "$out/gemm_decode_blocks$b.log" &
    done
    wait
    for b in 2 3; do echo "blocks $b: $(tail -n 1 "$out/gemm_decode_blocks$b.log")"; grep -h "^FAILED" "$out/gemm_decode_blocks$b.log" | head -n 5; done ;;
  gemm-pipelined)
    QUAD_PREFILL_GEMM=pipelined QUAD_DECODE_GEMM=pipelined QUAD_GEMM_TEST_MS=9,17,40,2053 timeout 540 \
      python3 scripts/gpu_gemm_check.py -q 2>&1 | quiet > "$out/gemm_pipelined_tests.log"
    tail -n 1 "$out/gemm_pipelined_tests.log"; grep -h "^FAILED" "$out/gemm_pipelined_tests.log" | head -n 5 ;;
  gemm-ws)
    QUAD_PREFILL_GEMM=ws QUAD_GEMM_TEST_MS=2053 timeout 300 python3 scripts/gpu_gemm_check.py -q 2>&1 | quiet \
      > "$out/gemm_ws_tests.log"
    echo "$(grep -c '^FAILED' "$out/gemm_ws_tests.log") failed"; grep -h "^FAILED" "$out/gemm_ws_tests.log" | head -n 5 ;;
  prefill-sdpa)  # flash attention over the dequantized cache for prefills with a cached prefix
    timeout 120 python3 -m pytest -q -m gpu tests/test_kv_attention_gpu.py -k "flash_over or dequant" 2>&1 | quiet \
      > "$out/prefill_sdpa_tests.log"
    tail -n 1 "$out/prefill_sdpa_tests.log"; grep -h "^FAILED" "$out/prefill_sdpa_tests.log" | head -n 5
    for path in sdpa kernel; do
      QUAD_PREFILL_ATTENTION=$path timeout 200 python3 -m pytest -q -s -m gpu tests/test_engine_gpu.py -k chunked 2>&1 \
        | quiet > "$out/prefill_engine_$path.log"
      echo "QUAD_PREFILL_ATTENTION=$path:"; grep -E "chunked prefill|passed|failed" "$out/prefill_engine_$path.log"
    done
    timeout 200 python3 bench/attention.py --prefill-only --out "$out/attention_prefill.json" 2>&1 | quiet \
      > "$out/attention_prefill.log"
    tail -n 6 "$out/attention_prefill.log" ;;
  decode) bash "$0" "$out" gemm-decode > "$out/gemm_decode.txt" 2>&1 & gemm_pid=$!
          timeout 400 python3 -m pytest -q -m gpu tests/test_kv_attention_gpu.py -k decode 2>&1 | quiet \
            > "$out/kv_decode_tests.log" & kv_pid=$!
          timeout 400 python3 -m pytest -q -m gpu tests/test_head_gpu.py 2>&1 | quiet > "$out/head_tests.log" & head_pid=$!
          wait $gemm_pid $kv_pid $head_pid
          for log in gemm_decode_tests kv_decode_tests head_tests; do echo "$log: $(tail -n 1 "$out/$log.log")"; done
          grep -h "^FAILED" "$out/gemm_decode_tests.log" "$out/kv_decode_tests.log" "$out/head_tests.log" | head -n 20 ;;
  quantize) timeout 560 python3 -m pytest -q -m gpu tests/test_quantize_gpu.py 2>&1 | quiet > "$out/quantize_tests.log"
            tail -n 3 "$out/quantize_tests.log" ;;
  quantize-clusters) timeout 300 python3 -m pytest -q -m gpu tests/test_quantize_gpu.py -k "cluster or dispatch or fast_silu" 2>&1 | quiet \
                       > "$out/quantize_cluster_tests.log"
                     tail -n 3 "$out/quantize_cluster_tests.log" ;;
  attention-rf) timeout 300 python3 -m pytest -q -m gpu tests/test_kv_attention_gpu.py -k register 2>&1 | quiet \
                  > "$out/attention_rf_tests.log"
                tail -n 3 "$out/attention_rf_tests.log"
                timeout 250 python3 bench/attention.py --quick --decode-only --variants rf_s1,rf_s3,rf_lazy8,tile \
                  --out "$out/attention_rf.json" 2>&1 | quiet | tail -n 14 ;;
  kv) timeout 560 python3 -m pytest -q -m gpu tests/test_kv_attention_gpu.py 2>&1 | quiet > "$out/kv_tests.log"
      tail -n 3 "$out/kv_tests.log" ;;
  rope) timeout 200 python3 -m pytest -q -m gpu tests/test_rope_kv_store_gpu.py 2>&1 | quiet > "$out/rope_tests.log"
        tail -n 3 "$out/rope_tests.log"
        # The engine's logits against the reference with the fused kernel (the default) and without.
        for fused in 1 0; do
          QUAD_FUSED_ROPE=$fused timeout 200 python3 -m pytest -q -s -m gpu tests/test_engine_gpu.py -k "logits or chunked or graphs" \
            2>&1 | quiet > "$out/engine_fused_rope_$fused.log"
          echo "QUAD_FUSED_ROPE=$fused:"; grep -E "logits vs|passed|failed" "$out/engine_fused_rope_$fused.log"
        done ;;
  engine) bash scripts/gpu_engine.sh "$out" check ;;
  swiglu) timeout 200 python3 -m pytest -q -m gpu tests/test_gemm_gpu.py -k swiglu 2>&1 | quiet > "$out/swiglu_tests.log"
          tail -n 1 "$out/swiglu_tests.log"; grep -h "^FAILED" "$out/swiglu_tests.log" | head -n 5
          timeout 150 python3 -m pytest -q -s -m gpu tests/test_engine_gpu.py -k fused_swiglu 2>&1 | quiet \
            > "$out/swiglu_engine.log"
          grep -E "fused SwiGLU|passed|failed" "$out/swiglu_engine.log"
          AB_VARIANTS="base QUAD_FUSED_SWIGLU=1" AB_PREFILL=1x2048,16x2048 AB_DECODE="" bash scripts/gpu_engine.sh "$out" ab ;;
  stream) timeout 330 python3 -m pytest -q -m gpu tests/test_quantize_gpu.py -k "stream or dispatch_takes" 2>&1 \
            | quiet > "$out/stream_tests.log"
          tail -n 1 "$out/stream_tests.log"; grep -h "^FAILED" "$out/stream_tests.log" | head -n 5
          AB_VARIANTS="base QUAD_HADAMARD_STREAM_MIN=0" AB_PREFILL=1x2048,16x2048 AB_DECODE="" \
            bash scripts/gpu_engine.sh "$out" ab ;;
  mma) timeout 330 python3 -m pytest -q -s -m gpu tests/test_quantize_gpu.py -k "mma or dispatch_takes" 2>&1 \
         | quiet > "$out/mma_tests.log"
       tail -n 1 "$out/mma_tests.log"; grep -h "^FAILED" "$out/mma_tests.log" | head -n 5
       grep -h "differing from the scalar" "$out/mma_tests.log" | cut -c1-160
       AB_VARIANTS="base QUAD_HADAMARD_MMA=0" AB_PREFILL=1x2048,16x2048 AB_DECODE="" \
         bash scripts/gpu_engine.sh "$out" ab ;;
  square) timeout 200 python3 -m pytest -q -s -m gpu tests/test_quantize_gpu.py -k square 2>&1 | quiet > "$out/square_tests.log"
          tail -n 1 "$out/square_tests.log"; grep -h "^FAILED" "$out/square_tests.log" | head -n 5
          grep -h "differing from the one-block" "$out/square_tests.log" | cut -c1-160 | head -n 8
          timeout 200 python3 bench/sweeps.py --hadamard-square --out "$out/sweep_square.json" 2>&1 | quiet \
            > "$out/sweep_square.log"
          grep "stream sweep" "$out/sweep_square.log" | cut -c1-150
          AB_VARIANTS="base QUAD_HADAMARD_SQUARE_MIN=1" AB_PREFILL=1x2048,16x2048 bash scripts/gpu_engine.sh "$out" ab ;;
  norm) timeout 200 python3 -m pytest -q -m gpu tests/test_quantize_gpu.py -k rmsnorm 2>&1 | quiet > "$out/norm_tests.log"
        tail -n 1 "$out/norm_tests.log"; grep -h "^FAILED" "$out/norm_tests.log" | head -n 5
        AB_ROUNDS=2 AB_VARIANTS="base QUAD_NORM_DECODE_THREADS=0" bash scripts/gpu_engine.sh "$out" ab ;;
  l2-prefetch) timeout 150 python3 -m pytest -q -m gpu tests/test_quantize_gpu.py -k prefetch 2>&1 | quiet \
                 > "$out/l2_prefetch_tests.log"
               tail -n 1 "$out/l2_prefetch_tests.log"; grep -h "^FAILED" "$out/l2_prefetch_tests.log" | head -n 5
               QUAD_L2_PREFETCH_MB=32 timeout 150 python3 -m pytest -q -s -m gpu tests/test_engine_gpu.py \
                 -k "logits_track or graphs_on_and_off" 2>&1 | quiet > "$out/l2_prefetch_engine.log"
               grep -E "logits vs|passed|failed" "$out/l2_prefetch_engine.log"
               AB_DECODE=1x1024,32x1024 AB_VARIANTS="base QUAD_L2_PREFETCH_MB=16 QUAD_L2_PREFETCH_MB=32
                 QUAD_L2_PREFETCH_MB=32,QUAD_L2_PREFETCH_SITES=norm QUAD_L2_PREFETCH_MB=32,QUAD_L2_PREFETCH_SITES=o+down" \
                 bash scripts/gpu_engine.sh "$out" ab ;;
  sweep-hadamard-stream) timeout 300 python3 bench/sweeps.py --hadamard-stream --out "$out/sweep_stream.json" 2>&1 \
                           | quiet > "$out/sweep_stream.log"
                         grep "stream sweep" "$out/sweep_stream.log" | cut -c1-150 ;;
  sweep-rs-panel) timeout 330 python3 bench/sweeps.py --rs-panel --out "$out/sweep_rs_panel.json" 2>&1 \
                    | quiet > "$out/sweep_rs_panel.log"
                  grep "sweep rs-panel" "$out/sweep_rs_panel.log" | sed "s/'tiles': {[^}]*}, //" | cut -c1-170 ;;
  bench-kernels) timeout 560 python3 bench/kernels.py --quick --out "$out/kernels.json" 2>&1 | quiet > "$out/kernels.log"
                 tail -n 5 "$out/kernels.log" ;;
  bench-attention) timeout 560 python3 bench/attention.py --quick --out "$out/attention.json" 2>&1 | quiet \
                     > "$out/attention.log"
                   tail -n 5 "$out/attention.log" ;;
  sweep-splits) timeout 560 python3 bench/attention.py --sweep-splits --out "$out/sweep_splits.json" 2>&1 | quiet \
                  > "$out/sweep_splits.log"
                tail -n 5 "$out/sweep_splits.log" ;;
  sweep-decode) timeout 560 python3 bench/sweeps.py --decode --out "$out/sweep_decode.json" 2>&1 | quiet \
                  > "$out/sweep_decode.log"
                tail -n 5 "$out/sweep_decode.log" ;;
  sweep-decode-ws) timeout 560 python3 bench/sweeps.py --decode-ws --out "$out/sweep_decode_ws.json" 2>&1 | quiet \
                     > "$out/sweep_decode_ws.log"
                   tail -n 5 "$out/sweep_decode_ws.log" ;;
  sweep-hadamard) timeout 560 python3 bench/sweeps.py --hadamard --out "$out/sweep_hadamard.json" 2>&1 | quiet \
                    > "$out/sweep_hadamard.log"
                  grep "sweep hadamard" "$out/sweep_hadamard.log" | tail -n 20 ;;
  sweep-hadamard-gated)
    PYTHONPATH=$PWD/bench:${PYTHONPATH:-} timeout 500 python3 -c "
import json, sys, torch, sweeps_quantize
rows = sweeps_quantize.sweep_hadamard(14336, True)
json.dump({'device': torch.cuda.get_device_name(), 'torch': torch.__version__, 'rows': rows},
          open(sys.argv[1], 'w'), indent=1)" "$out/sweep_hadamard_gated.json" 2>&1 | quiet > "$out/sweep_hadamard_gated.log"
    grep "sweep hadamard" "$out/sweep_hadamard_gated.log" | tail -n 8 ;;
  *) echo "unknown part $part" >&2; exit 2 ;;
esac
