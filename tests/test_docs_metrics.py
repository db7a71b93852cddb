"""The metrics the docs list are the metrics a real gateway exports, with the same types and labels.

Sources of truth, both checked: a real gateway process's ``/metrics`` (every family it exports,
with ``# HELP``/``# TYPE`` even before its first sample, and the labels of the samples it has),
and the label names the collectors are declared with (``gateway/metrics.py``, built in-process),
for families that have no sample yet on a fresh gateway. The docs are the metric tables of
``docs/observability.md`` and the metrics paragraph of the README. The response cache's families
(``gateway_cache_*``) exist only with a ``cache`` section: their table is checked against a second
gateway with the cache on (Redis at 127.0.0.1:6379, a key prefix of its own).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from gateway.backends import BackendPool
from gateway.cache.metrics import CacheMetrics
from gateway.config import load_settings
from gateway.metrics import GatewayMetrics
from gateway.pipeline.admit import Admission
from tests.jobs_helpers import poll
from tests.procs import ROOT, Gateway, Sim

# A row of a metric table: | `name` | type | `label`, `label` (or —) | meaning |
DOC_ROW = re.compile(r"^\| `(gateway_[a-z_]+)` \| (\w+) \| ([^|]*) \|", re.M)
# A metric in the README's paragraph, with its labels when it gives them: `name{a,b}`
README_NAME = re.compile(r"`(gateway_[a-z_]+)(?:\{([a-z_,]+)\})?`")

Metrics = dict[str, tuple[str, frozenset[str]]]  # exposition name -> (type, label names)
CACHE = "gateway_cache_"  # families a gateway exports only with a `cache` section
REDIS = "redis://127.0.0.1:6379/0"


def exposition_name(family: str, kind: str) -> str:
    """The name the docs use: counters are scraped (and queried) with their `_total` suffix."""
    return family + "_total" if kind == "counter" else family


def documented() -> Metrics:
    text = (ROOT / "docs" / "observability.md").read_text()
    rows = DOC_ROW.findall(text)
    assert rows, "no metric table found in docs/observability.md"
    out: Metrics = {}
    for name, kind, labels in rows:
        assert name not in out, f"{name} is documented twice"
        out[name] = (kind, frozenset(re.findall(r"`(\w+)`", labels)))
    return out


def readme_metrics() -> dict[str, frozenset[str] | None]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    return {
        name: frozenset(labels.split(",")) if labels else None
        for name, labels in README_NAME.findall(section)
    }


def declared() -> Metrics:
    """Every family of the gateway's registry with the label names it is declared with."""
    settings = load_settings(backends=[{"url": "http://127.0.0.1:9", "models": ["tiny"]}])
    pool = BackendPool(settings.backends, settings.resilience)
    pool.backends[0].models = {"tiny": {}}  # as after a health check: the pool's series appear
    admission = Admission(pool, settings.admission, {})
    metrics = GatewayMetrics(pool, admission)
    out: Metrics = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            kind = str(value._type)
            out[exposition_name(value._name, kind)] = (kind, frozenset(value._labelnames))
    for fam in metrics._collector.collect():
        labels = {frozenset(s.labels) for s in fam.samples}
        assert len(labels) == 1, (fam.name, labels)
        out[fam.name] = (fam.type, labels.pop())
    return out


def declared_cache() -> Metrics:
    """The cache's families (gateway/cache/metrics.py) with the label names they are declared with."""
    metrics = CacheMetrics(CollectorRegistry(), set(), lambda metric, *labels: metric.labels(*labels))
    out: Metrics = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            kind = str(value._type)
            out[exposition_name(value._name, kind)] = (kind, frozenset(value._labelnames))
    return out


def scraped(gw: Gateway) -> dict[str, tuple[str, set[frozenset[str]]]]:
    """{exposition name: (type, label-name sets of its samples)} from the gateway's /metrics."""
    text = httpx.get(gw.url + "/metrics", timeout=5).text
    out: dict[str, tuple[str, set[frozenset[str]]]] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name.endswith("_created"):  # the parser's family for prometheus-client's _created samples
            continue
        labels = {frozenset(s.labels) - {"le"} for s in fam.samples}
        out[exposition_name(fam.name, fam.type)] = (fam.type, labels)
    return out


@pytest.fixture(scope="module")
def real(gateway: Gateway) -> dict[str, tuple[str, set[frozenset[str]]]]:
    """/metrics of a real gateway after a plain request, a stream and a bad request."""
    c = openai.OpenAI(base_url=gateway.v1, api_key="x", max_retries=0)
    msgs: Any = [{"role": "user", "content": "a b"}]
    c.chat.completions.create(model="tiny", messages=msgs, max_tokens=2)
    list(c.chat.completions.create(model="tiny", messages=msgs, max_tokens=2, stream=True))
    assert (
        httpx.post(
            gateway.v1 + "/chat/completions",
            content=b"{bad json",
            headers={"content-type": "application/json"},
        ).status_code
        == 400
    )
    return scraped(gateway)


@pytest.fixture(scope="module")
def cached(
    sim: Sim, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, tuple[str, set[frozenset[str]]]]]:
    """/metrics of a gateway with the cache on after a miss, hits (plain, streamed) and a bypass."""
    prefix = f"test:docs-metrics:{secrets.token_hex(4)}:"
    cfg: Path = tmp_path_factory.mktemp("cached") / "gw.yaml"
    cfg.write_text(yaml.safe_dump({"cache": {"storage": REDIS, "key_prefix": prefix}}))
    gw = Gateway([sim.url], config=cfg)
    try:
        c = openai.OpenAI(base_url=gw.v1, api_key="x", max_retries=0)
        msgs: Any = [{"role": "user", "content": f"docs {prefix}"}]

        def ask(**kw: Any) -> str:
            r = c.chat.completions.with_raw_response.create(model="tiny", messages=msgs, max_tokens=2, **kw)
            return str(r.headers["x-gateway-cache"])

        assert ask(temperature=0) == "miss"
        poll(lambda: ask(temperature=0), lambda got: got == "hit", 10, "a hit")
        stream = c.chat.completions.with_raw_response.create(
            model="tiny", messages=msgs, max_tokens=2, temperature=0, stream=True
        )
        assert stream.headers["x-gateway-cache"] == "hit"
        list(stream.parse())
        assert ask(temperature=0.7) == "bypass"
        yield scraped(gw)
    finally:
        gw.stop()
        r = redis.Redis.from_url(REDIS)
        for key in r.scan_iter(match=prefix + "*", count=1000):
            r.unlink(key)
        r.close()


def test_every_documented_metric_is_exported_with_its_type_and_labels(real: Any) -> None:
    code = declared()
    for name, (kind, labels) in documented().items():
        if name.startswith(CACHE):
            continue  # the next test
        assert name in real, f"docs/observability.md lists {name}; the gateway does not export it"
        assert real[name][0] == kind, f"{name}: documented as {kind}, exported as {real[name][0]}"
        assert code[name][1] == labels, (
            f"{name}: documented labels {sorted(labels)}, real {sorted(code[name][1])}"
        )
        for sample_labels in real[name][1]:
            assert sample_labels == labels, f"{name}: a scraped sample has labels {sorted(sample_labels)}"


def test_the_cache_metrics_documented_are_those_a_gateway_with_the_cache_exports(
    real: Any, cached: Any
) -> None:
    code, docs = declared_cache(), {n: v for n, v in documented().items() if n.startswith(CACHE)}
    assert set(cached) - set(real) == set(code), "the cache adds exactly its own families"
    assert sorted(set(code) ^ set(docs)) == [], "docs/observability.md vs gateway/cache/metrics.py"
    for name, (kind, labels) in docs.items():
        assert cached[name][0] == kind, f"{name}: documented as {kind}, exported as {cached[name][0]}"
        assert code[name][1] == labels, (
            f"{name}: documented labels {sorted(labels)}, real {sorted(code[name][1])}"
        )
        for sample_labels in cached[name][1]:
            assert sample_labels == labels, f"{name}: a scraped sample has labels {sorted(sample_labels)}"


def test_every_exported_metric_is_documented(real: Any) -> None:
    docs, readme = documented(), readme_metrics()
    assert set(real) == set(declared())  # the registry built here is the one the gateway runs
    assert sorted(set(real) - set(docs)) == [], "exported, missing from docs/observability.md"
    assert sorted(set(real) - set(readme)) == [], "exported, missing from the README's Metrics paragraph"


def test_the_readme_metrics_paragraph_names_real_metrics_and_labels(real: Any) -> None:
    code = declared()
    for name, labels in readme_metrics().items():
        assert name in real, f"the README lists {name}; the gateway does not export it"
        if labels is not None:
            assert labels == code[name][1], f"README: {name}{{{','.join(sorted(labels))}}}"
