#!/usr/bin/env python3
"""Deployment checks that no off-the-shelf linter does; run by scripts/lint-deploy.sh.

    check_deploy.py dockerfile  The gateway image's stage: non-root numeric USER, HEALTHCHECK
                                (Python, 127.0.0.1, /ready, start period), exec-form ENTRYPOINT,
                                pinned slim base, no build tools.
    check_deploy.py compose     Compose files: interpolated, the CPU override merged the way
                                Docker Compose merges (!reset, !override included), each result
                                validated against the Compose specification's JSON schema (the
                                copy vendored in check-jsonschema), then the stack's own rules.
    check_deploy.py ecs         The CloudFormation task definition, service, scalable target and
                                scaling policy, turned into API requests and validated with
                                botocore's ECS / Application Auto Scaling models; then the rules.
    check_deploy.py k8s [M]     Kubernetes rules: probes, drain budget, PDB, KEDA, ServiceMonitor;
                                of deploy/k8s, or of the manifests in M (the rendered Helm chart).
    check_deploy.py crds DIR [M]  ScaledObject / ServiceMonitor through their published schemas
                                (npm @kubernetes-models, installed under DIR; validate_crds.mjs).
    check_deploy.py dashboards  Grafana dashboards: structure, metric names the gateway and vLLM
                                really export.
    check_deploy.py promql OUT  Every PromQL expression (dashboards, KEDA) as a rules file for
                                `promtool check rules`.
    check_deploy.py alerts      Alerting rules (deploy/prometheus/alerts.yml): loaded by
                                prometheus.yml, severity/summary/description/runbook_url on each,
                                runbook anchors present in the docs, metrics really exported, a
                                firing and a not-firing case for each in alerts_test.yml.
    check_deploy.py gateway     Every gateway configuration the deployments use (compose env, ECS
                                env, the Kubernetes ConfigMap) loaded by the gateway's own settings
                                model; needs the project's venv (`make install`).

Each prints its findings and exits 1 if there are any. Only stdlib and PyYAML at import time.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CPU = ROOT / "compose.cpu.yml"
ECS_TEMPLATE = ROOT / "deploy" / "ecs" / "llm-gateway.yaml"
K8S = ROOT / "deploy" / "k8s"
DASHBOARDS = ROOT / "dashboards"
VLLM_METRICS_FIXTURE = ROOT / "tests" / "fixtures" / "vllm-0.32.0-cpu" / "metrics.txt"
GATEWAY_METRICS_SOURCES = (
    ROOT / "gateway" / "metrics.py",
    ROOT / "gateway" / "jobs" / "metrics.py",
    ROOT / "gateway" / "cache" / "metrics.py",
    ROOT / "gateway" / "ledger" / "metrics.py",
    ROOT / "gateway" / "ledger" / "budget.py",
)
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
DRAIN_SECONDS = 30.0


class Findings:
    def __init__(self, title: str) -> None:
        self.title = title
        self.items: list[str] = []

    def check(self, ok: Any, message: str) -> bool:
        if not ok:
            self.items.append(message)
        return bool(ok)

    def finish(self) -> int:
        for item in self.items:
            print(f"  FAIL {self.title}: {item}")
        if not self.items:
            print(f"  ok   {self.title}")
        return 1 if self.items else 0


# --------------------------------------------------------------------------- Dockerfile

DOCKERFILE = ROOT / "Dockerfile"


def cmd_dockerfile(_: list[str]) -> int:
    """What hadolint does not enforce: the gateway stage's user, health check, entrypoint, base."""
    f = Findings("Dockerfile rules")
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    stages: list[list[str]] = []
    for ln in lines:
        if ln.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(ln)
    f.check(len(stages) >= 2, "not a multi-stage build")
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)", text, re.M)
    f.check(
        base and re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", base.group(1)),
        "base image must be a pinned python:X.Y.Z-slim-<distro> tag",
    )
    final = stages[-1] if stages else []
    words = [ln.split(None, 1) for ln in final]
    by = {}
    for w in words:
        by.setdefault(w[0].upper(), []).append(w[1] if len(w) > 1 else "")
    users = by.get("USER", [])
    f.check(users and users[-1].split(":")[0] not in ("0", "root"), "final stage must run as a non-root USER")
    f.check(users and users[-1].split(":")[0].isdigit(), "USER must be numeric (runAsNonRoot can verify it)")
    hc = " ".join(by.get("HEALTHCHECK", []))
    for needle, why in (
        ("--start-period=", "a start period"),
        ("127.0.0.1", "127.0.0.1, not localhost"),
        ("/ready", "the /ready endpoint"),
        ('CMD ["python"', "Python in exec form (no curl, no shell)"),
    ):
        f.check(needle in hc, f"HEALTHCHECK needs {why}")
    f.check("curl" not in hc and "localhost" not in hc, "HEALTHCHECK must not use curl or localhost")
    entry = by.get("ENTRYPOINT", [""])[-1]
    f.check(entry.startswith("["), "ENTRYPOINT must be exec form so SIGTERM reaches the gateway")
    joined = " ".join(by.get("RUN", []))
    for tool in ("apt-get", "gcc", "build-essential", "pip install", "curl", "wget"):
        f.check(tool not in joined, f"final stage installs or uses {tool}")
    f.check(not any(ln.upper().startswith("COPY . ") for ln in final), "final stage copies the source tree")
    return f.finish()


# --------------------------------------------------------------------------- Compose


class Reset:
    """`!reset`: drop the attribute inherited from the base file."""


class Override:
    """`!override`: replace the attribute instead of merging it."""

    def __init__(self, value: Any) -> None:
        self.value = value


class ComposeLoader(yaml.SafeLoader):
    pass


def _reset(loader: yaml.SafeLoader, node: yaml.Node) -> Reset:
    return Reset()


def _override(loader: yaml.SafeLoader, node: yaml.Node) -> Override:
    if isinstance(node, yaml.MappingNode):
        return Override(loader.construct_mapping(node, deep=True))
    if isinstance(node, yaml.SequenceNode):
        return Override(loader.construct_sequence(node, deep=True))
    return Override(loader.construct_scalar(node))  # type: ignore[arg-type]


ComposeLoader.add_constructor("!reset", _reset)
ComposeLoader.add_constructor("!override", _override)

_VAR = re.compile(r"\$(?:\$|\{(?P<braced>[^}]*)\}|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))")


def interpolate(value: Any, env: dict[str, str], problems: list[str], where: str = "") -> Any:
    """Docker Compose's variable interpolation, on every string of the document."""
    if isinstance(value, dict):
        return {k: interpolate(v, env, problems, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env, problems, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Override):
        return Override(interpolate(value.value, env, problems, where))
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        expr = m.group("braced") if m.group("braced") is not None else m.group("plain")
        for op in (":-", "-", ":?", "?", ":+", "+"):
            if op in expr:
                name, arg = expr.split(op, 1)
                break
        else:
            name, op, arg = expr, "", ""
        val = env.get(name)
        if op == ":-":
            return val if val else arg
        if op == "-":
            return val if val is not None else arg
        if op in (":?", "?"):
            if not val:
                problems.append(f"{where}: ${{{name}}} is required ({arg})")
            return val or ""
        if op in (":+", "+"):
            return arg if val else ""
        if val is None:
            problems.append(f"{where}: ${{{name}}} is unset and has no default")
        return val or ""

    return _VAR.sub(sub, value)


def _as_mapping(value: Any, sep: str = "=") -> dict[str, Any]:
    if isinstance(value, dict):
        return dict(value)
    out: dict[str, Any] = {}
    for item in value or []:
        key, _, val = str(item).partition(sep)
        out[key] = val if _ else None
    return out


def _depends_mapping(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return dict(value)
    return {name: {"condition": "service_started"} for name in value or []}


def _volume_target(v: Any) -> str:
    if isinstance(v, dict):
        return str(v.get("target"))
    parts = str(v).split(":")
    return parts[1] if len(parts) > 1 else parts[0]


REPLACED = {"command", "entrypoint"}


def merge_service(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Docker Compose's merge rules for one service (the keys this stack uses, and the common ones)."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Reset):
            out.pop(key, None)
        elif isinstance(value, Override):
            out[key] = value.value
        elif key in REPLACED or key not in out:
            out[key] = value
        elif key in ("environment", "labels", "annotations", "extra_hosts", "sysctls"):
            out[key] = {**_as_mapping(out[key]), **_as_mapping(value)}
        elif key == "depends_on":
            out[key] = {**_depends_mapping(out[key]), **_depends_mapping(value)}
        elif key in ("volumes", "devices"):
            merged = {_volume_target(v): v for v in out[key]}
            merged.update({_volume_target(v): v for v in value})
            out[key] = list(merged.values())
        elif key == "healthcheck" and isinstance(value, dict):
            out[key] = {**out[key], **value}  # `test` is replaced, like every scalar
        elif isinstance(value, dict) and isinstance(out[key], dict):
            out[key] = merge_service(out[key], value)
        elif isinstance(value, list) and isinstance(out[key], list):
            out[key] = out[key] + [v for v in value if v not in out[key]]
        else:
            out[key] = value
    return out


def merge_compose(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if key == "services":
            services = dict(out.get("services") or {})
            for name, svc in value.items():
                services[name] = merge_service(services.get(name, {}), svc or {})
            out["services"] = services
        elif isinstance(value, Reset):
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def strip_tags(value: Any) -> Any:
    """What is left once merged: a tag in a single file means the attribute is absent / replaced."""
    if isinstance(value, dict):
        return {k: strip_tags(v) for k, v in value.items() if not isinstance(v, Reset)}
    if isinstance(value, list):
        return [strip_tags(v) for v in value if not isinstance(v, Reset)]
    if isinstance(value, Override):
        return strip_tags(value.value)
    return value


def load_compose(path: Path, problems: list[str]) -> dict[str, Any]:
    data = yaml.load(path.read_text(), Loader=ComposeLoader)  # a SafeLoader subclass
    return interpolate(data, {}, problems, path.name)  # type: ignore[no-any-return]


def compose_schema_validator() -> Any:
    from importlib.resources import files

    import jsonschema

    schema = json.loads(
        files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text()
    )
    return jsonschema.Draft202012Validator(schema)


def _seconds(duration: Any) -> float:
    total = 0.0
    for num, unit in re.findall(r"([\d.]+)(ms|us|h|m|s)", str(duration)):
        total += float(num) * {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}[unit]
    return total


def compose_rules(f: Findings, doc: dict[str, Any], gpu: bool) -> None:
    services = doc.get("services", {})
    active = {n: s for n, s in services.items() if not s.get("profiles")}
    for name in ("vllm", "gateway", "redis", "prometheus", "grafana"):
        f.check(name in active, f"service {name} missing")
    for name, svc in active.items():
        for dep in _depends_mapping(svc.get("depends_on")):
            f.check(dep in active, f"{name} depends on {dep}, which a plain `up` does not start")
        hc = svc.get("healthcheck") or {}
        test = " ".join(map(str, hc.get("test", [])))
        f.check("localhost" not in test, f"{name}: health check uses localhost (use 127.0.0.1)")
        f.check("curl" not in test, f"{name}: health check uses curl (not in slim images)")
        image = str(svc.get("image", ""))
        if "build" not in svc:
            f.check(
                ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"),
                f"{name}: image {image!r} is not pinned",
            )
        for vol in svc.get("volumes", []):
            src = str(vol.get("source") if isinstance(vol, dict) else str(vol).split(":")[0])
            if src.startswith("."):
                f.check((ROOT / src).exists(), f"{name}: bind-mount source {src} does not exist")
            elif ":" in str(vol) and not src.startswith("/"):
                f.check(src in (doc.get("volumes") or {}), f"{name}: volume {src} is not declared")
    gw = active.get("gateway", {})
    deps = _depends_mapping(gw.get("depends_on"))
    f.check(
        deps.get("vllm", {}).get("condition") == "service_healthy",
        "gateway must wait for vllm: depends_on.vllm.condition service_healthy",
    )
    f.check(
        _seconds(gw.get("stop_grace_period", "10s")) > DRAIN_SECONDS, "gateway stop_grace_period <= drain"
    )
    env = _as_mapping(gw.get("environment"))
    f.check("127.0.0.1" not in str(env.get("GATEWAY_BACKENDS")), "compose gateway must reach vllm by name")
    for var in ("GATEWAY_RATE_LIMITS__STORAGE", "GATEWAY_JOBS__QUEUE", "GATEWAY_CACHE__STORAGE"):
        f.check("127.0.0.1" not in str(env.get(var, "")), f"compose gateway: {var} must reach redis by name")
    vllm = active.get("vllm", {})
    hc = vllm.get("healthcheck") or {}
    f.check("/health" in " ".join(map(str, hc.get("test", []))), "vllm health check must hit /health")
    gpu_devices = json.dumps(vllm.get("deploy", {}))
    if gpu:
        f.check(_seconds(hc.get("start_period", "0s")) >= 300, "vllm start_period < 300s: model load")
        f.check("gpu" in gpu_devices, "vllm has no GPU reservation")
        f.check(any("/models" in str(v) for v in vllm.get("volumes", [])), "vllm: no models volume")
        fetch = _depends_mapping(vllm.get("depends_on")).get("fetch-model", {})
        f.check(
            fetch.get("condition") == "service_completed_successfully",
            "vllm must start after fetch-model completed successfully",
        )
    else:
        f.check("gpu" not in gpu_devices, "CPU override still reserves a GPU")
        f.check("sim" in vllm.get("command", []), "CPU override: vllm is not the simulator")


def cmd_compose(_: list[str]) -> int:
    validator = compose_schema_validator()
    status = 0
    base_problems: list[str] = []
    base = load_compose(COMPOSE, base_problems)
    cpu_problems: list[str] = []
    cpu = load_compose(COMPOSE_CPU, cpu_problems)
    merged = strip_tags(merge_compose(base, cpu))
    for title, doc, problems, gpu in (
        ("docker-compose.yml (schema + rules)", strip_tags(base), base_problems, True),
        ("compose.cpu.yml alone (schema)", strip_tags(cpu), cpu_problems, None),
        ("docker-compose.yml + compose.cpu.yml merged (schema + rules)", merged, [], False),
    ):
        f = Findings(title)
        for p in problems:
            f.check(False, p)
        for err in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path)):
            where = "/".join(map(str, err.absolute_path)) or "<root>"
            f.check(False, f"schema: {where}: {err.message}")
        if gpu is not None:
            compose_rules(f, doc, gpu)
        status |= f.finish()
    return status


# --------------------------------------------------------------------------- CloudFormation / ECS


class CfnLoader(yaml.SafeLoader):
    pass


def _cfn_tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    name = "Ref" if suffix == "Ref" else f"Fn::{suffix}"
    if isinstance(node, yaml.ScalarNode):
        value: Any = loader.construct_scalar(node)
        if suffix == "GetAtt":
            value = str(value).split(".", 1)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)  # type: ignore[arg-type]
    return {name: value}


CfnLoader.add_multi_constructor("!", _cfn_tag)


class Resolver:
    """Resolves intrinsics with the parameters' defaults and placeholders for the rest."""

    NO_VALUE = object()

    def __init__(self, template: dict[str, Any], conditions_true: bool) -> None:
        self.params = template.get("Parameters", {})
        self.resources = template.get("Resources", {})
        self.conditions_true = conditions_true

    def ref(self, name: str) -> Any:
        if name == "AWS::NoValue":
            return self.NO_VALUE
        if name.startswith("AWS::"):
            return {"AWS::Region": "us-east-1", "AWS::Partition": "aws"}.get(name, "llm-gateway")
        if name in self.params:
            if str(self.params[name].get("Type", "")).startswith(("List<", "CommaDelimitedList")):
                return ["placeholder-1", "placeholder-2"]
            default = self.params[name].get("Default")
            if default not in (None, ""):
                return default
            return "https://placeholder.example.com/x" if "https" in str(self.params[name]) else "placeholder"
        return f"arn:aws:placeholder:::{name}"

    def __call__(self, value: Any) -> Any:
        if isinstance(value, dict):
            if len(value) == 1:
                ((key, arg),) = value.items()
                if key == "Ref":
                    return self.ref(arg)
                if key == "Fn::Sub":
                    text = arg if isinstance(arg, str) else arg[0]
                    return re.sub(
                        r"\$\{([^!}][^}]*)\}", lambda m: str(self.ref(m.group(1).split(".")[0])), text
                    )
                if key == "Fn::GetAtt":
                    return f"arn:aws:placeholder:::{'.'.join(arg)}"
                if key == "Fn::If":
                    return self(arg[1] if self.conditions_true else arg[2])
                if key == "Fn::Join":
                    return arg[0].join(str(self(v)) for v in arg[1])
            out = {}
            for k, v in value.items():
                r = self(v)
                if r is not self.NO_VALUE:
                    out[k] = r
            return out
        if isinstance(value, list):
            items = [self(v) for v in value]
            return [v for v in items if v is not self.NO_VALUE]
        return value


def to_api(value: Any, shape: Any, path: str, problems: list[str], aliases: dict[str, str]) -> Any:
    """CloudFormation properties -> API request, guided by the botocore shape (names, types)."""
    kind = shape.type_name
    if kind == "structure":
        if not isinstance(value, dict):
            problems.append(f"{path}: expected an object")
            return value
        members = {name.lower(): name for name in shape.members}
        out = {}
        for key, v in value.items():
            name = aliases.get(key) or members.get(key.lower())
            if name is None:
                problems.append(f"{path}.{key}: not a member of {shape.name}")
                continue
            out[name] = to_api(v, shape.members[name], f"{path}.{key}", problems, aliases)
        return out
    if kind == "list":
        if not isinstance(value, list):
            problems.append(f"{path}: expected a list")
            return value
        return [to_api(v, shape.member, f"{path}[{i}]", problems, aliases) for i, v in enumerate(value)]
    if kind == "map":
        return {str(k): to_api(v, shape.value, f"{path}.{k}", problems, aliases) for k, v in value.items()}
    if kind in ("integer", "long"):
        try:
            return int(value)
        except (TypeError, ValueError):
            problems.append(f"{path}: {value!r} is not an integer")
            return value
    if kind in ("double", "float"):
        return float(value)
    if kind == "boolean":
        return value if isinstance(value, bool) else str(value).lower() == "true"
    return value if not isinstance(value, (int, float)) or isinstance(value, bool) else str(value)


def botocore_check(
    f: Findings, service: str, operation: str, props: dict[str, Any], aliases: dict[str, str]
) -> dict[str, Any]:
    import botocore.session
    from botocore.exceptions import ParamValidationError
    from botocore.validate import validate_parameters

    model = botocore.session.get_session().get_service_model(service)
    shape = model.operation_model(operation).input_shape
    problems: list[str] = []
    request = to_api(props, shape, operation, problems, aliases)
    for p in problems:
        f.check(False, p)
    try:
        validate_parameters(request, shape)
    except ParamValidationError as exc:
        f.check(False, f"{service} {operation}: {exc}")
    return request  # type: ignore[no-any-return]


def _find(resources: dict[str, Any], cfn_type: str) -> tuple[str, dict[str, Any]]:
    for name, res in resources.items():
        if res.get("Type") == cfn_type:
            return name, res.get("Properties", {})
    raise SystemExit(f"{ECS_TEMPLATE.name}: no {cfn_type}")


def ecs_rules(
    f: Findings, td: dict[str, Any], svc: dict[str, Any], scaling: dict[str, Any], target: dict[str, Any]
) -> None:
    containers = {c["name"]: c for c in td.get("containerDefinitions", [])}
    vllm, gw, fetch = (
        containers.get("vllm", {}),
        containers.get("gateway", {}),
        containers.get("fetch-model", {}),
    )
    f.check(td.get("networkMode") == "awsvpc", "networkMode must be awsvpc (containers share 127.0.0.1)")
    f.check(
        {"type": "GPU", "value": "1"} in vllm.get("resourceRequirements", []),
        "vllm needs a GPU resourceRequirement",
    )
    f.check(
        {"containerName": "vllm", "condition": "HEALTHY"} in gw.get("dependsOn", []),
        "gateway must dependsOn vllm HEALTHY",
    )
    f.check(
        {"containerName": "fetch-model", "condition": "SUCCESS"} in vllm.get("dependsOn", []),
        "vllm must dependsOn fetch-model SUCCESS",
    )
    f.check(fetch.get("essential") is False, "fetch-model must not be essential (it exits)")
    hc = vllm.get("healthCheck", {})
    budget = hc.get("startPeriod", 0) + hc.get("interval", 30) * hc.get("retries", 3)
    f.check(hc.get("startPeriod", 0) >= 300 and budget >= 600, f"vllm health budget {budget}s < 600s")
    f.check(vllm.get("startTimeout", 0) >= budget, "vllm startTimeout shorter than its health budget")
    f.check("/health" in " ".join(hc.get("command", [])), "vllm health check must hit /health")
    for c in containers.values():
        cmd = " ".join(c.get("healthCheck", {}).get("command", []))
        f.check(
            "localhost" not in cmd and "curl" not in cmd, f"{c['name']}: health check: 127.0.0.1, no curl"
        )
    f.check("/live" in " ".join(gw.get("healthCheck", {}).get("command", [])), "gateway health check: /live")
    f.check(gw.get("stopTimeout", 30) > DRAIN_SECONDS, "gateway stopTimeout must exceed the drain")
    f.check(all(c.get("stopTimeout", 30) <= 120 for c in containers.values()), "stopTimeout > 120 s")
    env = {e["name"]: e["value"] for e in gw.get("environment", [])}
    f.check("127.0.0.1:8000" in env.get("GATEWAY_BACKENDS", ""), "gateway must reach vLLM on 127.0.0.1:8000")
    volumes = {v["name"]: v for v in td.get("volumes", [])}
    f.check(
        any("host" in volumes.get(m["sourceVolume"], {}) for m in vllm.get("mountPoints", [])),
        "vllm weights must be on a host volume",
    )
    f.check(svc.get("healthCheckGracePeriodSeconds", 0) >= 900, "service health-check grace < 900 s")
    ttc = scaling.get("TargetTrackingScalingPolicyConfiguration", {})
    spec = ttc.get("CustomizedMetricSpecification", {})
    # One metric, or metric math whose inputs are (the stat of each query)
    names = (
        [spec.get("MetricName", "")]
        if "MetricName" in spec
        else [
            q.get("MetricStat", {}).get("Metric", {}).get("MetricName", "") for q in spec.get("Metrics", [])
        ]
    )
    metric = ",".join(n for n in names if n)
    f.check(
        any("queue" in n or "requests_waiting" in n or "jobs_pending" in n for n in names),
        f"scaling metric {metric!r} is not queue depth",
    )
    f.check("PredefinedMetricSpecification" not in ttc, "scaling must not use a predefined (CPU) metric")
    f.check(ttc.get("ScaleInCooldown", 0) >= 600, "ScaleInCooldown < 600 s")
    f.check(target.get("MaxCapacity", 0) >= 1, "no MaxCapacity")


def cmd_ecs(_: list[str]) -> int:
    template = yaml.load(ECS_TEMPLATE.read_text(), Loader=CfnLoader)  # a SafeLoader subclass
    status = 0
    for conditions in (False, True):
        f = Findings(
            f"{ECS_TEMPLATE.name} vs botocore models (conditions {'true' if conditions else 'false'})"
        )
        resolve = Resolver(template, conditions)
        resources = template["Resources"]
        _, td_props = _find(resources, "AWS::ECS::TaskDefinition")
        _, svc_props = _find(resources, "AWS::ECS::Service")
        _, target_props = _find(resources, "AWS::ApplicationAutoScaling::ScalableTarget")
        _, policy_props = _find(resources, "AWS::ApplicationAutoScaling::ScalingPolicy")
        td = botocore_check(f, "ecs", "RegisterTaskDefinition", resolve(td_props), {})
        svc_in = {"ServiceName": "llm-gateway", **resolve(svc_props)}
        svc = botocore_check(f, "ecs", "CreateService", svc_in, {"PlacementStrategies": "placementStrategy"})
        target = botocore_check(
            f, "application-autoscaling", "RegisterScalableTarget", resolve(target_props), {}
        )
        policy_in = {k: v for k, v in resolve(policy_props).items() if k != "ScalingTargetId"}
        for key in ("ServiceNamespace", "ResourceId", "ScalableDimension"):
            policy_in[key] = target.get(key)
        policy = botocore_check(f, "application-autoscaling", "PutScalingPolicy", policy_in, {})
        ecs_rules(f, td, svc, policy, target)
        status |= f.finish()
    return status


# --------------------------------------------------------------------------- Kubernetes


def k8s_docs(root: Path = K8S) -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(root.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path, doc


def _probe_budget(probe: dict[str, Any]) -> int:
    return int(probe.get("initialDelaySeconds", 0)) + int(probe.get("periodSeconds", 10)) * int(
        probe.get("failureThreshold", 3)
    )


def _prestop_sleep(container: dict[str, Any]) -> int:
    pre = container.get("lifecycle", {}).get("preStop", {})
    if "sleep" in pre:
        return int(pre["sleep"]["seconds"])
    cmd = pre.get("exec", {}).get("command", [])
    return int(cmd[1]) if len(cmd) == 2 and cmd[0] == "sleep" else 0


def cmd_k8s(args: list[str]) -> int:
    root = Path(args[0]) if args else K8S
    f = Findings(f"{root.name if args else 'deploy/k8s'} rules")
    docs = list(k8s_docs(root))
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for path, doc in docs:
        if path.parent == root:
            by_kind.setdefault(doc["kind"], []).append(doc)
        f.check(
            doc.get("metadata", {}).get("namespace", "llm-gateway") == "llm-gateway"
            or doc["kind"] == "Namespace",
            f"{path.name}: {doc['kind']} outside the llm-gateway namespace",
        )
    if not args:
        kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
        listed = set(kustomization.get("resources", []))
        top = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
        f.check(listed == top, f"kustomization resources {sorted(listed)} != files {sorted(top)}")
    for kind in ("Deployment", "Service", "PodDisruptionBudget", "ServiceMonitor", "ScaledObject"):
        f.check(kind in by_kind, f"no {kind}")
    dep = by_kind["Deployment"][0]
    spec = dep["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in spec["containers"]}
    vllm, gw = containers.get("vllm", {}), containers.get("gateway", {})
    f.check("replicas" not in dep["spec"], "Deployment sets replicas: KEDA owns them")
    f.check(vllm.get("resources", {}).get("limits", {}).get("nvidia.com/gpu"), "vllm: no GPU limit")
    f.check("startupProbe" in vllm, "vllm: no startupProbe")
    f.check(_probe_budget(vllm.get("startupProbe", {})) >= 900, "vllm startupProbe allows < 15 min to load")
    f.check(vllm.get("startupProbe", {}).get("httpGet", {}).get("path") == "/health", "vllm startup: /health")
    f.check(
        gw.get("readinessProbe", {}).get("httpGet", {}).get("path") == "/ready", "gateway readiness: /ready"
    )
    f.check(gw.get("livenessProbe", {}).get("httpGet", {}).get("path") == "/live", "gateway liveness: /live")
    f.check("livenessProbe" in vllm, "vllm: no livenessProbe")
    grace = int(spec.get("terminationGracePeriodSeconds", 30))
    gw_stop, vllm_stop = _prestop_sleep(gw), _prestop_sleep(vllm)
    f.check(gw_stop > 0 and vllm_stop > 0, "both containers need a preStop")
    f.check(gw_stop + DRAIN_SECONDS <= vllm_stop, "vLLM's preStop must outlast the gateway's preStop + drain")
    f.check(vllm_stop < grace <= 110, f"terminationGracePeriodSeconds {grace}: > vLLM preStop, < spot notice")
    f.check(any(c["name"] == "fetch-model" for c in spec.get("initContainers", [])), "no fetch-model init")
    f.check(
        "--model=/models/" in " ".join(vllm.get("args", []))
        and any(e.get("name") == "HF_HUB_OFFLINE" for e in vllm.get("env", [])),
        "vllm must serve the fetched copy offline",
    )
    labels = dep["spec"]["template"]["metadata"]["labels"]
    for pdb in by_kind.get("PodDisruptionBudget", []):
        sel = pdb["spec"]["selector"]["matchLabels"]
        f.check(sel.items() <= labels.items(), "PDB selector does not match the pods")
    services = {s["metadata"]["name"]: s for s in by_kind.get("Service", [])}
    for sm in by_kind.get("ServiceMonitor", []):
        sel = sm["spec"]["selector"]["matchLabels"]
        match = [s for s in services.values() if sel.items() <= s["metadata"].get("labels", {}).items()]
        f.check(len(match) == 1, "ServiceMonitor must select exactly one Service")
        ports = {p["name"] for s in match for p in s["spec"]["ports"]}
        for ep in sm["spec"]["endpoints"]:
            f.check(ep["port"] in ports, f"ServiceMonitor port {ep['port']} not on the Service")
    for path, doc in docs:
        if doc["kind"] != "ScaledObject":
            continue
        so = doc["spec"]
        f.check(so["scaleTargetRef"]["name"] == dep["metadata"]["name"], f"{path.name}: wrong scale target")
        queries = [t["metadata"].get("query", "") for t in so["triggers"] if t["type"] == "prometheus"]
        f.check(
            any("vllm:num_requests_waiting" in q and q.startswith("sum(") for q in queries),
            f"{path.name}: no summed vllm:num_requests_waiting trigger",
        )
        f.check(all(t["type"] != "cpu" for t in so["triggers"]), f"{path.name}: scales on CPU")
        f.check(so.get("maxReplicaCount"), f"{path.name}: no maxReplicaCount")
        down = so.get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior", {})
        f.check(
            down.get("scaleDown", {}).get("stabilizationWindowSeconds", 0) >= 600,
            f"{path.name}: scale-down stabilization < 600 s",
        )
        monitored = {
            s["metadata"]["name"]
            for sm in by_kind.get("ServiceMonitor", [])
            for s in services.values()
            if sm["spec"]["selector"]["matchLabels"].items() <= s["metadata"].get("labels", {}).items()
        }
        for q in queries:
            if "vllm:" in q:
                named = set(re.findall(r'\bservice="([^"]+)"', q))
                f.check(named and named <= monitored, f"{path.name}: query must select the monitored service")
    return f.finish()


def cmd_crds(args: list[str]) -> int:
    node_dir = Path(args[0]).resolve()
    root = Path(args[1]).resolve() if len(args) > 1 else K8S
    docs = [
        {"file": str(p.relative_to(ROOT) if p.is_relative_to(ROOT) else p), "doc": d}
        for p, d in k8s_docs(root)
        if d.get("kind") in ("ScaledObject", "ServiceMonitor")
    ]
    # ES modules resolve packages from the script's own folder: run a copy beside node_modules.
    script = node_dir / "validate_crds.mjs"
    script.write_text(Path(__file__).with_name("validate_crds.mjs").read_text())
    proc = subprocess.run(
        ["node", str(script)],
        input=json.dumps(docs),
        text=True,
        capture_output=True,
        cwd=node_dir,
        check=False,
    )
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    return proc.returncode


# --------------------------------------------------------------------------- dashboards / PromQL


def dashboard_exprs(dash: dict[str, Any]) -> Iterator[tuple[str, str]]:
    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    for p in panels(dash.get("panels", [])):
        for t in p.get("targets", []):
            yield p.get("title", "?"), t.get("expr", "")


def exported_metric_names() -> set[str]:
    source = "\n".join(p.read_text() for p in GATEWAY_METRICS_SOURCES)
    names = set(re.findall(r'"(gateway_[a-z_]+)"', source))
    # Families named in a loop: f"gateway_backend_{name}" ... for name in ("a", "b", ...)
    for prefix, var in re.findall(r'f"(gateway_[a-z_]*)\{(\w+)\}"', source):
        for values in re.findall(rf"for {var} in \(([^)]*)\)", source):
            names |= {prefix + v for v in re.findall(r'"([a-z_:]+)"', values)}
    names |= set(re.findall(r"^# TYPE (vllm:[a-z_:]+)", VLLM_METRICS_FIXTURE.read_text(), re.M))
    return names


def _base_metric(name: str) -> str:
    return re.sub(r"_(total|bucket|sum|count|created)$", "", name)


def cmd_dashboards(_: list[str]) -> int:
    status = 0
    known = {_base_metric(n) for n in exported_metric_names()}
    for path in sorted(DASHBOARDS.glob("*.json")):
        f = Findings(f"dashboards/{path.name}")
        try:
            dash = json.loads(path.read_text())
        except ValueError as exc:
            f.check(False, f"not JSON: {exc}")
            status |= f.finish()
            continue
        f.check(dash.get("uid") and dash.get("title"), "uid and title are required")
        f.check(isinstance(dash.get("schemaVersion"), int), "schemaVersion missing")
        ids = [p.get("id") for p in dash.get("panels", [])]
        f.check(len(ids) == len(set(ids)) and None not in ids, "panel ids must be unique")
        for p in dash.get("panels", []):
            f.check({"x", "y", "w", "h"} <= set(p.get("gridPos", {})), f"panel {p.get('title')}: gridPos")
            for t in p.get("targets", []):
                f.check(
                    t.get("refId") and t.get("expr"), f"panel {p.get('title')}: target without refId/expr"
                )
        used = set()
        for title, expr in dashboard_exprs(dash):
            for name in re.findall(r"\b(gateway_[a-z_]+|vllm:[a-z_:]+)", expr):
                used.add(_base_metric(name))
                f.check(
                    _base_metric(name) in known,
                    f"panel {title}: {name} is not exported by the gateway or vLLM 0.32",
                )
        if path.name == "gateway-overview.json":
            for name in (
                "gateway_requests",
                "gateway_request_duration_seconds",
                "gateway_time_to_first_token_seconds",
                "gateway_requests_in_flight",
                "gateway_backend_up",
                "vllm:num_requests_waiting",
            ):
                f.check(name in used, f"no panel shows {name}")
        status |= f.finish()
    return status


def cmd_promql(args: list[str]) -> int:
    """Write every PromQL expression as a recording rule, for `promtool check rules`."""
    rules = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        for i, (_, expr) in enumerate(dashboard_exprs(json.loads(path.read_text()))):
            expr = re.sub(r"\$__(rate_interval|interval|range)", "5m", expr)
            expr = re.sub(r"\$\{?[A-Za-z_]+\}?", "x", expr)
            rules.append({"record": f"check:{path.stem.replace('-', '_')}:{i}", "expr": expr})
    for path, doc in k8s_docs():
        if doc.get("kind") == "ScaledObject":
            for t in doc["spec"]["triggers"]:
                if "query" in t.get("metadata", {}):
                    name = f"check:keda:{path.stem.replace('-', '_')}:{t.get('name', 'q').replace('-', '_')}"
                    rules.append({"record": name, "expr": t["metadata"]["query"]})
    Path(args[0]).write_text(yaml.safe_dump({"groups": [{"name": "lint-deploy", "rules": rules}]}))
    print(f"  ok   {len(rules)} PromQL expressions collected for promtool")
    return 0


# --------------------------------------------------------------------------- alerting rules

SEVERITIES = {"critical", "warning"}


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def doc_anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)  # no headings in code
    return {github_anchor(m) for m in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", text, re.M)}


def cmd_alerts(_: list[str]) -> int:
    f = Findings("deploy/prometheus alerting rules")
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    rule_files = config.get("rule_files") or []
    f.check("alerts.yml" in rule_files, "prometheus.yml does not load alerts.yml (rule_files)")
    for name in rule_files:
        f.check(
            (PROMETHEUS_DIR / name).is_file(), f"rule file {name} (relative to prometheus.yml) is missing"
        )
    known = {_base_metric(n) for n in exported_metric_names()}
    alerts: dict[str, dict[str, Any]] = {}
    for group in yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]:
        for rule in group["rules"]:
            name = rule.get("alert")
            if not f.check(name, f"group {group['name']}: a rule that is not an alert"):
                continue
            f.check(name not in alerts, f"{name}: defined twice")
            alerts[name] = rule
            labels, notes = rule.get("labels", {}), rule.get("annotations", {})
            f.check(
                labels.get("severity") in SEVERITIES, f"{name}: severity must be one of {sorted(SEVERITIES)}"
            )
            for key in ("summary", "description", "runbook_url"):
                f.check(notes.get(key), f"{name}: no {key} annotation")
            doc, _, anchor = str(notes.get("runbook_url", "")).partition("#")
            path = ROOT / doc
            if f.check(
                doc.startswith("docs/") and path.is_file() and anchor, f"{name}: runbook_url {doc}#{anchor}"
            ):
                f.check(anchor in doc_anchors(path), f"{name}: {doc} has no heading for #{anchor}")
            for metric in re.findall(r"\b(gateway_[a-z_]+|vllm:[a-z_:]+)", rule["expr"]):
                f.check(_base_metric(metric) in known, f"{name}: {metric} is not exported")
    tests = yaml.safe_load((PROMETHEUS_DIR / "alerts_test.yml").read_text())
    f.check("alerts.yml" in tests.get("rule_files", []), "alerts_test.yml does not load alerts.yml")
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in tests.get("tests", []):
        for t in case.get("alert_rule_test", []):
            (firing if t.get("exp_alerts") else quiet).add(t["alertname"])
    for name in alerts:
        f.check(name in firing, f"{name}: no test where it fires")
        f.check(name in quiet, f"{name}: no test where it must not fire")
    f.check(
        not (firing | quiet) - set(alerts),
        f"tests for unknown alerts: {sorted((firing | quiet) - set(alerts))}",
    )
    status = f.finish()
    # The compose stack mounts prometheus.yml file by file: its rule files need a mount too.
    problems: list[str] = []
    prom = strip_tags(load_compose(COMPOSE, problems)).get("services", {}).get("prometheus", {})
    targets = {_volume_target(v) for v in prom.get("volumes", [])}
    for name in rule_files:
        if f"/etc/prometheus/{name}" not in targets and "/etc/prometheus" not in targets:
            print(
                f"  WARN docker-compose.yml: the prometheus service does not mount {name}, so Prometheus "
                "starts silently without those rules; add "
                f"`- ./deploy/prometheus/{name}:/etc/prometheus/{name}:ro`"
            )
    return status


# --------------------------------------------------------------------------- gateway configs


def gateway_configs() -> Iterator[tuple[str, dict[str, str], str | None]]:
    """(where, environment, config file text) for every gateway the deployments start."""
    problems: list[str] = []
    base = load_compose(COMPOSE, problems)
    merged = strip_tags(merge_compose(base, load_compose(COMPOSE_CPU, problems)))
    for title, doc in (
        ("docker-compose.yml", strip_tags(base)),
        ("compose merged with compose.cpu.yml", merged),
    ):
        env = _as_mapping(doc["services"]["gateway"].get("environment"))
        yield title, {k: str(v) for k, v in env.items()}, None
    template = yaml.load(ECS_TEMPLATE.read_text(), Loader=CfnLoader)  # a SafeLoader subclass
    _, td = _find(template["Resources"], "AWS::ECS::TaskDefinition")
    for c in Resolver(template, False)(td)["ContainerDefinitions"]:
        if c["Name"] == "gateway":
            yield "ECS task definition", {e["Name"]: str(e["Value"]) for e in c["Environment"]}, None
    for path, doc in k8s_docs():
        if doc.get("kind") == "ConfigMap" and "gateway.yaml" in doc.get("data", {}):
            yield f"{path.name} gateway.yaml", {}, doc["data"]["gateway.yaml"]


def cmd_gateway(_: list[str]) -> int:
    import tempfile

    try:
        from gateway.config import ConfigError, load_settings
    except ImportError:
        print("  FAIL the gateway package is not importable: run `make install` first")
        return 1
    status = 0
    saved = dict(os.environ)
    for where, env, text in gateway_configs():
        f = Findings(f"gateway settings from {where}")
        for key in [k for k in os.environ if k.startswith("GATEWAY_")]:
            del os.environ[key]
        os.environ.update(env)
        os.environ.setdefault("GATEWAY_SERVER__HOST", "0.0.0.0")  # the image's ENV
        try:
            if text is not None:
                with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as tmp:
                    tmp.write(text)
                try:
                    settings = load_settings(tmp.name)
                finally:
                    os.unlink(tmp.name)
            else:
                settings = load_settings()
            unknown = [
                k
                for k in env
                if k.startswith("GATEWAY_")
                and k.split("__")[0][8:].lower() not in type(settings).model_fields
            ]
            f.check(not unknown, f"unknown settings {unknown}")
            f.check(
                settings.server.drain_seconds <= DRAIN_SECONDS, "drain_seconds above the budget used here"
            )
        except ConfigError as exc:
            f.check(False, str(exc).replace("\n", "; "))
        finally:
            os.environ.clear()
            os.environ.update(saved)
        status |= f.finish()
    return status


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "dockerfile": cmd_dockerfile,
    "compose": cmd_compose,
    "ecs": cmd_ecs,
    "k8s": cmd_k8s,
    "crds": cmd_crds,
    "dashboards": cmd_dashboards,
    "promql": cmd_promql,
    "alerts": cmd_alerts,
    "gateway": cmd_gateway,
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: check_deploy.py {{{','.join(COMMANDS)}}} [ARGS]", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main(sys.argv[1:]))
