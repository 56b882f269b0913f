# Source this on the GPU machine, from the repository root:  . bench/course/gpu_env.sh
# Installs the carried wheels (.whl/, made by ../shared/gpu-wheels.sh) into /tmp/site, and the
# FlashInfer kernels an earlier call compiled (.jitcache/jitcache.tar.xz, made by
# bench/course/export_jit_cache.sh) as FlashInfer "AOT" modules: FlashInfer loads a module from
# <package>/data/aot/<name>/<name>.so when it exists, instead of compiling it (minutes per
# fresh machine). Both folders travel with `carry`; they are not part of the repository.
# It works: on 2026-11-25 a fresh H100 machine loaded all ten carried modules (attention, norm,
# rope, silu_and_mul, sampling) and `pytest -m gpu` ran in 16 s instead of minutes of JIT.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .whl/*.whl || return 1
export PYTHONPATH=/tmp/site:$PWD
if [ -f .jitcache/jitcache.tar.xz ]; then
  mkdir -p /tmp/site/flashinfer/data && tar -C /tmp/site/flashinfer/data -xJf .jitcache/jitcache.tar.xz
  echo "flashinfer: $(ls /tmp/site/flashinfer/data/aot | wc -l) precompiled modules"
fi
