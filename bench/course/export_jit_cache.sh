#!/usr/bin/env bash
# On the GPU machine, after a run: pack every FlashInfer module compiled so far (JIT cache and
# modules already loaded as AOT) into DEST/jitcache.tar.xz, laid out as FlashInfer's AOT
# directory (aot/<name>/<name>.so). Carry it back as .jitcache/ and bench/course/gpu_env.sh installs it.
set -euo pipefail
dest=${1:?usage: export_jit_cache.sh DEST_DIR}
read -r jit aot < <(python3 -c "from flashinfer.jit import env; \
print(env.FLASHINFER_JIT_DIR, env.FLASHINFER_AOT_DIR)")
stage=$(mktemp -d)
for so in "$jit"/*/*.so "$aot"/*/*.so; do
  [ -f "$so" ] || continue
  name=$(basename "$(dirname "$so")")
  mkdir -p "$stage/aot/$name" && cp "$so" "$stage/aot/$name/"
done
tar -C "$stage" -cJf "$dest/jitcache.tar.xz" aot
echo "packed $(ls "$stage/aot" | wc -l) modules: $(du -h "$dest/jitcache.tar.xz" | cut -f1)"
