#!/usr/bin/env python3
"""Render the Helm chart offline, as `helm lint --strict` and `helm template` would; run by
scripts/lint-deploy.sh with the validators' venv (helm-python-sdk: Helm's own Go SDK behind a C
ABI, so no helm binary is needed).

    render_helm.py CHART OUT

Lints the chart (strict: warnings fail), then renders it once with its default values (OUT/default)
and once per CHART/ci/NAME-values.yaml (OUT/NAME): one file per template, for kubernetes-validate,
the CRD schemas, checkov and the deploy/k8s rules. The gateway config each render puts in its
ConfigMap is written beside it as OUT/NAME.gateway.yaml, for `llm-gateway check-config`.
Exits 1 on a lint finding or a template that does not render.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

RELEASE = "llm-gateway"
NAMESPACE = "llm-gateway"
SEVERITY = {0: "unknown", 1: "info", 2: "warning", 3: "error"}


def lint(chart: Path, values: dict[str, Any], name: str) -> int:
    report = helm.lint(str(chart), values, strict=True, namespace=NAMESPACE)
    failed = 0
    for msg in report["messages"]:
        severity = SEVERITY.get(msg["severity"], "?")
        if msg["severity"] >= 2:
            failed = 1
            print(f"  FAIL helm lint ({name}) {severity}: {msg['path']}: {msg['error']}")
    for err in report["errors"]:
        failed = 1
        print(f"  FAIL helm lint ({name}): {err}")
    return failed


def render(chart: Path, values: dict[str, Any], out: Path, name: str) -> int:
    out.mkdir(parents=True, exist_ok=True)
    with helm.Chart.load(str(chart)) as loaded:
        rendered = loaded.render(values, name=RELEASE, namespace=NAMESPACE)
    count = 0
    for template, text in sorted(rendered.items()):
        if not template.endswith(".yaml"):
            continue  # NOTES.txt
        docs = [d for d in yaml.safe_load_all(text) if d]
        if not docs:
            continue  # a template switched off by its values
        (out / Path(template).name).write_text(text)
        count += len(docs)
        for doc in docs:
            if doc.get("kind") == "ConfigMap" and "gateway.yaml" in doc.get("data", {}):
                (out.parent / f"{name}.gateway.yaml").write_text(doc["data"]["gateway.yaml"])
    print(f"  ok   {chart.name} rendered with {name} values: {count} objects in {out}")
    return 0


def main(argv: list[str]) -> int:
    chart, out = Path(argv[0]), Path(argv[1])
    sets: dict[str, dict[str, Any]] = {"default": {}}
    for path in sorted((chart / "ci").glob("*-values.yaml")):
        sets[path.name.removesuffix("-values.yaml")] = yaml.safe_load(path.read_text()) or {}
    status = 0
    for name, values in sets.items():
        status |= lint(chart, values, name)
        try:
            status |= render(chart, values, out / name, name)
        except helm.HelmError as exc:
            print(f"  FAIL helm template ({name}): {exc}")
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
