#!/usr/bin/env bash
# `make run`: the gateway on 127.0.0.1:8080 in front of the bundled vLLM simulator on :8000.
# With BACKEND=url (or GATEWAY_BACKENDS set) the simulator is skipped and the gateway fronts that vLLM.
set -euo pipefail
BIN=${BIN:-.venv/bin}
if [ -n "${BACKEND:-}" ]; then
  exec "$BIN/llm-gateway" serve --backend "$BACKEND"
fi
if [ -n "${GATEWAY_BACKENDS:-}" ]; then
  exec "$BIN/llm-gateway" serve
fi
"$BIN/llm-gateway" sim --port 8000 &
sim=$!
trap 'kill "$sim" 2>/dev/null || true' EXIT INT TERM
echo "vLLM simulator on http://127.0.0.1:8000 (pid $sim); gateway on http://127.0.0.1:8080"
"$BIN/llm-gateway" serve --backend http://127.0.0.1:8000
