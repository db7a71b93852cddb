#!/usr/bin/env bash
# Run the real vLLM (CPU build) OpenAI-compatible server in the foreground on
# 127.0.0.1:PORT. `exec` replaces this shell, so the caller's PID is vLLM's API
# server process (stop it with SIGTERM to the process group; it has child processes).
#
#   scripts/vllm/serve.sh PORT [MODEL_DIR] [SERVED_NAME] [EXTRA_VLLM_ARGS...]
#
# MODEL_DIR   default $VLLM_MODEL_DIR or .cache/tiny-llama (relative to the repo root)
# SERVED_NAME default tiny
# Environment: VLLM_VENV (default .venv-vllm at the repo root),
#              VLLM_MAX_MODEL_LEN (default 512; the tiny model allows up to 2048),
#              VLLM_SERVE_EXTRA_ARGS (extra flags, word-split; later flags win).
# Prerequisites: scripts/vllm/setup-venv.sh and scripts/vllm/make_tiny_model.py.
set -euo pipefail

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
abspath() { case "$1" in /*) echo "$1" ;; *) echo "$REPO_ROOT/$1" ;; esac; }

PORT="$1"
MODEL_DIR="$(abspath "${2:-${VLLM_MODEL_DIR:-.cache/tiny-llama}}")"
SERVED_NAME="${3:-tiny}"
shift $(( $# < 3 ? $# : 3 ))
VENV="$(abspath "${VLLM_VENV:-.venv-vllm}")"
PY="$VENV/bin/python"

[[ -x "$PY" ]] || { echo "serve.sh: no vLLM venv at $VENV (run scripts/vllm/setup-venv.sh)" >&2; exit 1; }
[[ -f "$MODEL_DIR/config.json" ]] || { echo "serve.sh: no model at $MODEL_DIR (run scripts/vllm/make_tiny_model.py)" >&2; exit 1; }

# No hub access here: everything is local. 1 GiB of KV cache is plenty for the tiny
# model (the default asks for a lot more memory).
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
export VLLM_NO_USAGE_STATS=1
export DO_NOT_TRACK=1
export TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1
# Keep vLLM's internal sockets on loopback (it would otherwise pick eth0's address).
export VLLM_HOST_IP=127.0.0.1
export VLLM_LOOPBACK_IP=127.0.0.1

extra=()
if [[ -n "${VLLM_SERVE_EXTRA_ARGS:-}" ]]; then
  # shellcheck disable=SC2206
  extra=(${VLLM_SERVE_EXTRA_ARGS})
fi

exec "$PY" -m vllm.entrypoints.openai.api_server \
  --model "$MODEL_DIR" \
  --served-model-name "$SERVED_NAME" \
  --host 127.0.0.1 \
  --port "$PORT" \
  --max-model-len "${VLLM_MAX_MODEL_LEN:-512}" \
  --dtype float32 \
  --enforce-eager \
  --max-num-seqs 8 \
  --seed 0 \
  --enable-request-id-headers \
  --enable-log-requests \
  "${extra[@]}" "$@"
