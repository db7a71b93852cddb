#!/usr/bin/env bash
# `make run`: the gateway on 127.0.0.1:8080 in front of the bundled vLLM simulator on :8000.
# With BACKEND=url (or GATEWAY_BACKENDS set) the simulator is skipped and the gateway fronts that vLLM.
# PORT and SIM_PORT change the two ports. Async jobs and the response cache are on when Redis
# answers (JOBS_REDIS, CACHE_REDIS; JOBS=0, CACHE=0).
set -euo pipefail
BIN=${BIN:-.venv/bin}
PORT=${PORT:-8080}
SIM_PORT=${SIM_PORT:-8000}
# Async jobs (docs/jobs.md) and the response cache (docs/cache.md) need Redis: on when one answers
# at JOBS_REDIS (default the local one), off with a word on how to get it otherwise. JOBS=0 and
# CACHE=0 keep them off. The cache uses CACHE_REDIS, by default the jobs' Redis: fine on a
# laptop; in production the cache gets a Redis of its own (docs/cache.md).
JOBS_REDIS=${JOBS_REDIS:-redis://127.0.0.1:6379/0}
CACHE_REDIS=${CACHE_REDIS:-}
redis_ok() {
  "$BIN/python" -c "import sys, redis
try:
    sys.exit(not redis.Redis.from_url(sys.argv[1], socket_timeout=1, socket_connect_timeout=1).ping())
except Exception:
    sys.exit(1)" "$JOBS_REDIS" 2>/dev/null
}
redis_state=unknown
if { [ "${JOBS:-1}" != "0" ] && [ -z "${GATEWAY_JOBS__ENABLED:-}" ]; } ||
  { [ "${CACHE:-1}" != "0" ] && [ -z "${GATEWAY_CACHE__STORAGE:-}" ]; }; then
  if redis_ok; then redis_state=up; else redis_state=down; fi
fi
if [ "${JOBS:-1}" != "0" ] && [ -z "${GATEWAY_JOBS__ENABLED:-}" ]; then
  if [ "$redis_state" = up ]; then
    export GATEWAY_JOBS__ENABLED=true GATEWAY_JOBS__QUEUE="$JOBS_REDIS"
    export GATEWAY_JOBS__FILES="${GATEWAY_JOBS__FILES:-file://$PWD/.data/files}"
    echo "jobs: on (Batch API, Prefer: respond-async) with Redis at $JOBS_REDIS, files in .data/files"
  else
    echo "jobs: off, no Redis answers at $JOBS_REDIS (docker compose up -d redis, or install" \
      "redis-server; JOBS_REDIS=url for another); everything else works without it"
  fi
fi
if [ "${CACHE:-1}" != "0" ] && [ -z "${GATEWAY_CACHE__STORAGE:-}" ]; then
  if [ "$redis_state" = up ]; then
    if [ -n "$CACHE_REDIS" ]; then
      export GATEWAY_CACHE__STORAGE="$CACHE_REDIS"
      echo "cache: on for requests with temperature 0 or a seed (x-gateway-cache header), Redis at $CACHE_REDIS"
    else
      export GATEWAY_CACHE__STORAGE="$JOBS_REDIS"
      echo "cache: on for requests with temperature 0 or a seed (x-gateway-cache header), Redis at" \
        "$GATEWAY_CACHE__STORAGE: the jobs' server, fine here; in production give the cache its own" \
        "(CACHE_REDIS=url; docs/cache.md)"
    fi
  else
    echo "cache: off, no Redis answers at $JOBS_REDIS"
  fi
fi
if [ -n "${BACKEND:-}" ]; then
  exec "$BIN/llm-gateway" serve --port "$PORT" --backend "$BACKEND"
fi
if [ -n "${GATEWAY_BACKENDS:-}" ]; then
  exec "$BIN/llm-gateway" serve --port "$PORT"
fi

# Start the simulator and wait for its own "listening" line: if the port is taken, the gateway must
# not start in front of whatever already listens there.
simlog=$(mktemp "${TMPDIR:-/tmp}/llm-gateway-sim.XXXXXX")
sim=""
gw=""
# shellcheck disable=SC2329 # invoked by the EXIT trap below
cleanup() {
  [ -n "$gw" ] && kill "$gw" 2>/dev/null || true
  [ -n "$sim" ] && kill "$sim" 2>/dev/null || true
  [ -n "$gw" ] && wait "$gw" 2>/dev/null || true
  [ -n "$sim" ] && wait "$sim" 2>/dev/null || true
  rm -f "$simlog"
}
trap cleanup EXIT
trap 'exit 0' INT TERM
"$BIN/llm-gateway" sim --port "$SIM_PORT" > >(tee "$simlog") 2>&1 &
sim=$!
for _ in $(seq 1 300); do
  if grep -q '"simulator listening"' "$simlog"; then
    break
  fi
  if ! kill -0 "$sim" 2>/dev/null; then
    echo "error: the vLLM simulator could not listen on 127.0.0.1:$SIM_PORT (is the port taken?);" \
      "set SIM_PORT, or BACKEND=url to use a running vLLM" >&2
    sim=""
    exit 1
  fi
  sleep 0.1
done
if ! grep -q '"simulator listening"' "$simlog"; then
  echo "error: the vLLM simulator did not start listening on 127.0.0.1:$SIM_PORT within 30 s" >&2
  exit 1
fi
echo "vLLM simulator on http://127.0.0.1:$SIM_PORT (pid $sim); starting the gateway on http://127.0.0.1:$PORT"
"$BIN/llm-gateway" serve --port "$PORT" --backend "http://127.0.0.1:$SIM_PORT" &
gw=$!
# Say when it is ready, as a person waits for: /ready is 200 once the simulator is polled healthy.
for _ in $(seq 1 300); do
  if ! kill -0 "$gw" 2>/dev/null; then
    break
  fi
  if "$BIN/python" -c "import sys, urllib.request
try:
    sys.exit(urllib.request.urlopen('http://127.0.0.1:$PORT/ready', timeout=1).status != 200)
except OSError:
    sys.exit(1)" 2>/dev/null; then
    echo "ready: OpenAI base_url http://127.0.0.1:$PORT/v1 (probes /live /ready /health, /metrics); Ctrl-C stops both"
    break
  fi
  sleep 0.1
done
status=0
wait "$gw" || status=$?
gw=""
exit "$status"
