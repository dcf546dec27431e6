#!/usr/bin/env bash
# On the GPU machine, after scripts/prepare_smollm2_gpu.sh's two upload calls: reassemble the GGUF,
# convert it (GPTQ on the GPU), and run quad-generate on a few prompts with the kernels, then the
# same with the reference backend for comparison. Logs under $1.
set -u
out=${1:?usage: scripts/gpu_smollm2_demo.sh OUT_DIR}
export PYTHONPATH=$PWD:$PWD/.smollm2/site:${PYTHONPATH:-}
mkdir -p "$out"
cat /tmp/sm/a /tmp/sm/b > /tmp/sm/model.gguf
[ "$(sha256sum /tmp/sm/model.gguf | cut -d' ' -f1)" = "$(cat .smollm2/site/gguf.sha256)" ] || { echo "GGUF checksum mismatch" >&2; exit 1; }
python3 -m converter.cli /tmp/sm/model.gguf /tmp/sm/ckpt --force ${CONVERT_ARGS:-} 2>&1 | tail -n 5 | tee "$out/convert.log"
prompts=(--prompt "What is the capital of France?" --prompt "Name three primary colors." --prompt "Write one sentence about the sea.")
python3 -m quad_engine.cli.generate /tmp/sm/ckpt --chat --max-new-tokens 48 "${prompts[@]}" 2>&1 | grep -v "INFO\|WARNING\|AnnotateWarp" | tee "$out/generate_gpu.log"
QUAD_BACKEND=reference python3 -m quad_engine.cli.generate /tmp/sm/ckpt --chat --max-new-tokens 48 --no-cuda-graph "${prompts[@]}" 2>&1 | grep -v "INFO\|WARNING" | tee "$out/generate_gpu_reference.log"
