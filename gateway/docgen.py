"""Render docs/configuration.md from the Settings schema (``make docs``); a test keeps it current."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from gateway.config import Settings

HEADER = """# Configuration

Generated from `gateway/config.py` by `make docs`; a test fails when this file is out of date.

Sources, highest priority first: CLI flags (`--backend`, `--host`, `--port`, `--workers`),
environment variables, the YAML file given with `--config`, defaults. An environment variable is
`GATEWAY_` + the key path joined with `__`, upper-case: `timeouts.idle` is `GATEWAY_TIMEOUTS__IDLE`.
`GATEWAY_BACKENDS` takes comma-separated URLs (`http://a:8000,http://b:8000`) or a JSON list of
backend objects. Unknown keys are errors: `llm-gateway check-config FILE` names them.

Example:

```yaml
server:
  host: 0.0.0.0
  port: 8080
backends:
  - url: http://127.0.0.1:8000
    models: [qwen2.5-7b]
    api_key: change-me        # vLLM's --api-key, sent upstream
timeouts:
  first_byte: 60
  idle: 30
```
"""


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value: Any = field.default_factory()  # type: ignore[call-arg]
        if isinstance(value, BaseModel):
            return ""
        if isinstance(value, list):
            value = [v.url if hasattr(v, "url") else v for v in value]
    else:
        value = field.default
    if value is None:
        return "—"
    return f"`{value}`"


def _type(field: FieldInfo) -> str:
    text = str(field.annotation).replace("typing.", "").replace("gateway.config.", "")
    text = text.replace("<class '", "").replace("'>", "").replace("pydantic.types.", "")
    return text.replace(" | ", " or ")


def render() -> str:
    out = [HEADER]
    for name, field in Settings.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.append(f"\n## `{name}`\n")
            out.append("| key | type | default | meaning |\n|---|---|---|---|")
            for sub, sf in ann.model_fields.items():
                desc = (sf.description or "").replace("|", "\\|")
                out.append(f"| `{name}.{sub}` | {_type(sf)} | {_default(sf)} | {desc} |")
        else:
            out.append(f"\n## `{name}`\n")
            out.append((field.description or "") + f" Default: {_default(field)}.\n")
            out.append("Each backend:\n\n| key | type | default | meaning |\n|---|---|---|---|")
            from gateway.config import BackendSettings

            for sub, sf in BackendSettings.model_fields.items():
                desc = (sf.description or "").replace("|", "\\|")
                default = "required" if sf.is_required() else _default(sf)
                out.append(f"| `{sub}` | {_type(sf)} | {default} | {desc} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(render(), end="")
