"""The Usage and Costs APIs honour every filter and grouping they accept, refuse the others by
name, and authenticate before they look at the query.

A real gateway (jobs and ledger on, the simulator behind it) answers chat requests from two API
keys (two teams) and runs a two-line batch for one of them, so the ledger holds interactive rows
of two credentials and job-line rows. The APIs are asked through the OpenAI SDK's admin client
(which sends lists as ``name[]=value`` and booleans as ``true``/``false``) and through httpx,
and every answer is checked against direct SQL over the events.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import httpx
import jsonschema
import openai
import pytest
import yaml

from tests.jobs_helpers import ALICE, CAROL, chat_lines, clean_prefix, jobs_config, poll, sha
from tests.ledger_pg import (
    SHARED_DSN,
    drop_schema,
    ledger_section,
    new_schema_name,
    run_sql,
    shared_server_or_fail,
)
from tests.procs import ROOT, Gateway, Sim, until
from tests.test_ledger import db_upgrade

SCHEMA = json.loads((ROOT / "tests/fixtures/openai-openapi/usage_response.schema.json").read_text())
USAGE = "/v1/organization/usage/completions"
COSTS = "/v1/organization/costs"
ADMIN = "sk-admin-usage-filters"
ALICE_ID = "key:" + sha(ALICE)[:12]  # what the ledger records as the credential
CAROL_ID = "key:" + sha(CAROL)[:12]
BATCH_ROW = r"request_id ~ '^batch_req_[0-9a-f]{24}$'"


@dataclass
class Ledger:
    gw: Gateway
    schema: str
    start: int  # before any row, aligned to the minute


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ledger]:
    shared_server_or_fail()
    tmp = tmp_path_factory.mktemp("usage-filters")
    schema = new_schema_name()
    path, prefix = jobs_config(tmp)
    cfg = yaml.safe_load(path.read_text())
    cfg["auth"]["api_keys"].append({"key": ADMIN, "subject": "ops", "scopes": ["admin"]})
    cfg["ledger"] = ledger_section(schema, tmp / "spool", 0.1)
    cfg["pricing"] = {"tiny": {"prompt_per_million": 1.0, "completion_per_million": 2.0}}
    path.write_text(yaml.safe_dump(cfg))
    db_upgrade(path)
    start = int(time.time()) // 60 * 60 - 60
    sim = Sim(None, "--model", "tiny")
    gw: Gateway | None = None
    try:
        gw = Gateway([sim.url], config=path)
        for key, n in ((ALICE, 3), (CAROL, 2)):
            c = openai.OpenAI(base_url=gw.v1, api_key=key, max_retries=0)
            for i in range(n):
                c.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": f"hi {i}"}], max_tokens=5 + i
                )
        c = openai.OpenAI(base_url=gw.v1, api_key=ALICE, max_retries=0)
        f = c.files.create(file=("in.jsonl", chat_lines(2)), purpose="batch")
        b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        poll(lambda: c.batches.retrieve(b.id), lambda x: x.status == "completed", 60, "batch completed")
        until(
            lambda: run_sql(SHARED_DSN, "SELECT count(*) AS n FROM events", schema=schema)[0]["n"] >= 7,
            "seven ledger rows",
            timeout=30,
        )
        yield Ledger(gw, schema, start)
    finally:
        if gw is not None:
            gw.stop()
        sim.stop()
        clean_prefix(prefix)
        drop_schema(SHARED_DSN, schema)


def sql_totals(lg: Ledger, where: str = "true") -> dict[str, Any]:
    (row,) = run_sql(
        SHARED_DSN,
        "SELECT count(*) AS n, coalesce(sum(prompt_tokens), 0) AS p,"
        " coalesce(sum(completion_tokens), 0) AS c, coalesce(sum(cost_usd), 0) AS usd"
        f" FROM events WHERE {where}",
        schema=lg.schema,
    )
    return dict(row)


def admin_client(lg: Ledger) -> openai.OpenAI:
    return openai.OpenAI(base_url=lg.gw.v1, api_key="unused", admin_api_key=ADMIN, max_retries=0)


def window(lg: Ledger, width: str) -> dict[str, Any]:
    """start_time and limit covering every row in one page."""
    step = {"1m": 60, "1h": 3600, "1d": 86400}[width]
    return {
        "start_time": lg.start - lg.start % step,
        "bucket_width": width,
        "limit": {"1m": 60, "1h": 3, "1d": 2}[width],
    }


def summed(results: list[dict[str, Any]]) -> dict[str, int]:
    return {
        "n": sum(r["num_model_requests"] for r in results),
        "p": sum(r["input_tokens"] for r in results),
        "c": sum(r["output_tokens"] for r in results),
    }


def sdk_usage(lg: Ledger, **params: Any) -> list[dict[str, Any]]:
    """Every result of one page asked through the OpenAI SDK (lists as ``name[]``), checked against
    OpenAI's UsageResponse schema."""
    page = admin_client(lg).admin.organization.usage.completions(**params)
    body = page.model_dump(mode="json", exclude_unset=True)
    jsonschema.validate(body, SCHEMA)
    assert body["has_more"] is False
    return [r for b in body["data"] for r in b["results"]]


def test_the_ledger_holds_what_the_filters_need(ledger: Ledger) -> None:
    """Two credentials; the batch's two lines are recognisable as job lines."""
    assert sql_totals(ledger)["n"] == 7
    assert sql_totals(ledger, f"credential = '{ALICE_ID}'")["n"] == 5
    assert sql_totals(ledger, f"credential = '{CAROL_ID}'")["n"] == 2
    assert sql_totals(ledger, BATCH_ROW)["n"] == 2
    assert sql_totals(ledger, f"{BATCH_ROW} AND credential = '{ALICE_ID}'")["n"] == 2


@pytest.mark.parametrize("width", ["1m", "1h", "1d"])
def test_each_filter_returns_only_matching_usage(ledger: Ledger, width: str) -> None:
    w = window(ledger, width)
    cases: list[tuple[dict[str, Any], str]] = [
        ({}, "true"),
        ({"api_key_ids": [ALICE_ID]}, f"credential = '{ALICE_ID}'"),
        ({"api_key_ids": [CAROL_ID, "key:000000000000"]}, f"credential = '{CAROL_ID}'"),
        ({"batch": True}, BATCH_ROW),
        ({"batch": False}, f"NOT {BATCH_ROW}"),
        ({"api_key_ids": [ALICE_ID], "batch": False}, f"credential = '{ALICE_ID}' AND NOT {BATCH_ROW}"),
        ({"project_ids": ["research"]}, "team = 'research'"),
        ({"user_ids": ["alice"]}, "subject = 'alice'"),
        ({"user_ids": ["alice"], "batch": True}, f"subject = 'alice' AND {BATCH_ROW}"),
        ({"models": ["tiny"]}, "model = 'tiny'"),
        ({"models": ["other"]}, "false"),
    ]
    for params, where in cases:
        want = sql_totals(ledger, where)
        got = summed(sdk_usage(ledger, **w, **params))
        assert got == {k: want[k] for k in ("n", "p", "c")}, (width, params)


@pytest.mark.parametrize("width", ["1m", "1h", "1d"])
def test_usage_groups_by_api_key_and_batch(ledger: Ledger, width: str) -> None:
    results = sdk_usage(ledger, **window(ledger, width), group_by=["api_key_id", "batch"])
    got: dict[tuple[str, bool], int] = {}
    for r in results:
        key = (r["api_key_id"], r["batch"])
        got[key] = got.get(key, 0) + r["num_model_requests"]
    assert got == {(ALICE_ID, False): 3, (ALICE_ID, True): 2, (CAROL_ID, False): 2}, width
    # one grouping at a time, httpx and the comma-separated form
    for group, field in (("api_key_id", "api_key_id"), ("batch", "batch")):
        r = httpx.get(
            ledger.gw.url + USAGE,
            params={**window(ledger, width), "group_by": f"{group},model"},
            headers={"authorization": f"Bearer {ADMIN}"},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        seen: dict[Any, int] = {}
        for b in r.json()["data"]:
            for res in b["results"]:
                assert res["model"] == "tiny"
                seen[res[field]] = seen.get(res[field], 0) + res["num_model_requests"]
        want = {ALICE_ID: 5, CAROL_ID: 2} if group == "api_key_id" else {True: 2, False: 5}
        assert seen == want, (width, group)


def test_costs_filter_and_group_by_api_key_and_line_item(ledger: Ledger) -> None:
    admin = admin_client(ledger).admin.organization.usage

    def amounts(**params: Any) -> dict[Any, Decimal]:
        page = admin.costs(start_time=ledger.start - ledger.start % 86400, limit=2, **params)
        body = page.model_dump(mode="json", exclude_unset=True)
        jsonschema.validate(body, SCHEMA)
        out: dict[Any, Decimal] = {}
        for b in body["data"]:
            for r in b["results"]:
                k = r.get("api_key_id")
                out[k] = out.get(k, Decimal(0)) + Decimal(str(r["amount"]["value"]))
        return out

    alice, carol = (sql_totals(ledger, f"credential = '{k}'")["usd"] for k in (ALICE_ID, CAROL_ID))
    assert alice > 0 and carol > 0
    (got,) = amounts(api_key_ids=[CAROL_ID]).values()
    assert abs(got - carol) < Decimal("1e-9")
    by_key = amounts(group_by=["api_key_id"])
    assert set(by_key) == {ALICE_ID, CAROL_ID}
    assert abs(by_key[ALICE_ID] - alice) < Decimal("1e-9")
    assert abs(by_key[CAROL_ID] - carol) < Decimal("1e-9")
    (everything,) = amounts(line_items=["tiny"]).values()
    assert abs(everything - (alice + carol)) < Decimal("1e-9")
    assert amounts(line_items=["other"]) == {}
    (research,) = amounts(project_ids=["research"]).values()
    assert abs(research - carol) < Decimal("1e-9")


REFUSED: list[tuple[str, dict[str, Any], str]] = [
    # OpenAI's parameters the ledger cannot honour: named, never ignored
    (USAGE, {"group_by": "service_tier"}, "group_by"),
    (USAGE, {"group_by[]": "api_source"}, "group_by"),
    (COSTS, {"group_by": "model"}, "group_by"),
    # other endpoints' filters, a misspelt filter, a filter on the wrong endpoint
    (USAGE, {"sources": "image.edit"}, "sources"),
    (USAGE, {"project_id": "search"}, "project_id"),
    (USAGE, {"line_items": "tiny"}, "line_items"),
    (COSTS, {"batch": "true"}, "batch"),
    (COSTS, {"models": "tiny"}, "models"),
    (COSTS, {"user_ids[]": "alice"}, "user_ids"),
    (USAGE, {"api_key_ids[0]": ALICE_ID}, "api_key_ids[0]"),
    # malformed values
    (USAGE, {"batch": "yes"}, "batch"),
    (USAGE, {"batch[]": "true"}, "batch"),
    (USAGE, {"project_ids": ""}, "project_ids"),
    (USAGE, {"api_key_ids": f"{ALICE_ID},"}, "api_key_ids"),
    (USAGE, {"limit": "ten"}, "limit"),
    (USAGE, {"end_time": "soon"}, "end_time"),
    (COSTS, {"bucket_width": "1m"}, "bucket_width"),
]


@pytest.mark.parametrize(
    ("path", "params", "param"),
    REFUSED,
    ids=[f"{p.rsplit('/', 1)[1]}-{i}" for i, (p, _, _) in enumerate(REFUSED)],
)
def test_parameters_the_gateway_cannot_honour_are_400s_naming_them(
    ledger: Ledger, path: str, params: dict[str, Any], param: str
) -> None:
    r = httpx.get(
        ledger.gw.url + path,
        params={"start_time": ledger.start, **params},
        headers={"authorization": f"Bearer {ADMIN}"},
        timeout=30,
    )
    assert r.status_code == 400, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param, err


def test_the_sdk_sees_a_refused_grouping_as_a_bad_request(ledger: Ledger) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        admin_client(ledger).admin.organization.usage.completions(
            start_time=ledger.start, group_by=["service_tier"]
        )
    assert info.value.param == "group_by"  # type: ignore[attr-defined]


def test_a_repeated_scalar_is_a_400(ledger: Ledger) -> None:
    r = httpx.get(
        ledger.gw.url + USAGE,
        params=[("start_time", str(ledger.start)), ("start_time", "0")],
        headers={"authorization": f"Bearer {ADMIN}"},
        timeout=30,
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "start_time", r.text


def test_rows_past_the_events_retention_are_refused_not_reported_empty(ledger: Ledger) -> None:
    """A query that must read the per-request rows (1m, an API key, batch) before they are kept
    (`retention_days`, 90 here) would find nothing: a 400 naming start_time, not empty buckets."""
    old = int(time.time()) // 86400 * 86400 - 120 * 86400
    for params in (
        {"bucket_width": "1d", "api_key_ids": ALICE_ID},
        {"bucket_width": "1h", "batch": "false"},
        {"bucket_width": "1d", "group_by": "api_key_id"},
        {"bucket_width": "1m"},
    ):
        r = httpx.get(
            ledger.gw.url + USAGE,
            params={"start_time": old, **params},
            headers={"authorization": f"Bearer {ADMIN}"},
            timeout=30,
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "start_time", (params, r.text)
    # the rollup goes further back: no per-request filter, no refusal
    r = httpx.get(
        ledger.gw.url + USAGE,
        params={"start_time": old, "bucket_width": "1d", "limit": 31},
        headers={"authorization": f"Bearer {ADMIN}"},
        timeout=30,
    )
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("path", [USAGE, COSTS])
def test_authentication_comes_before_query_validation(ledger: Ledger, path: str) -> None:
    """No credential → 401 and a non-admin → 403, whatever the query (even without start_time
    or with an unknown parameter); only an admin's query is validated (400)."""
    for params in ({}, {"start_time": "x"}, {"foo": "1"}):
        r = httpx.get(ledger.gw.url + path, params=params, timeout=30)
        assert r.status_code == 401, (params, r.status_code, r.text)
        assert r.json()["error"]["type"] == "authentication_error"
        r = httpx.get(
            ledger.gw.url + path, params=params, headers={"authorization": f"Bearer {ALICE}"}, timeout=30
        )
        assert r.status_code == 403, (params, r.status_code, r.text)
        r = httpx.get(
            ledger.gw.url + path, params=params, headers={"authorization": f"Bearer {ADMIN}"}, timeout=30
        )
        assert r.status_code == 400, (params, r.status_code, r.text)
    r = httpx.get(ledger.gw.url + path, headers={"authorization": f"Bearer {ADMIN}"}, timeout=30)
    assert r.json()["error"]["param"] == "start_time"
