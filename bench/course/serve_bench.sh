#!/usr/bin/env bash
# Start one stage's server from its source folder, run bench.serving against it at each request
# rate, then stop it. Used on the GPU machine for every stage's online numbers.
#   bench/course/serve_bench.sh SRC_DIR PORT OUT_PREFIX RATE [RATE...]  (extra args: $SERVE_ARGS, $BENCH_ARGS)
# writes OUT_PREFIX-r<RATE>.json for each rate.
set -euo pipefail
src=$1 port=$2 out=$3
shift 3
here=$(cd "$(dirname "$0")/../.." && pwd)  # the repository root
( cd "$src" && PYTHONPATH="$src:${PYTHONPATH:-}" exec python -m serve --model qwen3-0.6b \
    --load-format dummy --max-model-len 4096 --port "$port" --log-level warning ${SERVE_ARGS:-} ) &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 300); do
  python -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/health')" \
    2>/dev/null && break
  kill -0 $server || { echo "server exited"; exit 1; }
  sleep 1
done
for rate in "$@"; do
  ( cd "$here" && python -m bench.serving --base-url "http://127.0.0.1:$port" \
      --workload course ${BENCH_ARGS:-} --request-rate "$rate" --out "$out-r$rate.json" )
done
