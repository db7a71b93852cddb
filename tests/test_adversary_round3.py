"""Adversary round 3 (2026-12-01): what a fresh review of the jobs, batches, ledger and limits found.

Each test failed before its fix: an async submission left no trace (no ledger row, no audit
line, no X-Request-Id); ``POST /v1/batches`` read any body whole, unbounded and undecoded; an
upload's Content-Encoding was ignored (the coded bytes stored as the file); a replica kept
starting a batch's lines after another answered its cancel; a backend's absurd usage figures
were charged as reported.
"""

from __future__ import annotations

import asyncio
import gzip
import secrets
import socket
import time
import tracemalloc
from pathlib import Path

import httpx
import openai
import redis
import yaml

from gateway.auth.jwks import JwksCache
from gateway.config_auth import JwtSettings
from tests.jobs_helpers import ALICE, CAROL, chat_lines, jobs_config, poll
from tests.ledger_pg import (
    SHARED_DSN,
    drop_schema,
    ledger_section,
    new_schema_name,
    run_sql,
    shared_server_or_fail,
    wait_for,
)
from tests.procs import Gateway, Sim
from tests.test_ledger import db_upgrade

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def test_async_submissions_and_their_refusals_are_in_the_ledger_and_the_audit_log(tmp_path: Path) -> None:
    shared_server_or_fail()
    schema = new_schema_name()
    sim = Sim(None, "--model", "tiny")
    path, _ = jobs_config(tmp_path)
    cfg = yaml.safe_load(path.read_text())
    cfg["ledger"] = ledger_section(schema, tmp_path / "spool")
    cfg["teams"]["research"] = {"models": ["nothing-here"]}  # carol may not use tiny
    path.write_text(yaml.safe_dump(cfg))
    db_upgrade(path)
    g = Gateway([sim.url], config=path)
    tag = secrets.token_hex(4)
    cases = {  # request id -> (key, expected status)
        f"acc-{tag}": (ALICE, 202),
        f"bad-{tag}": ("sk-nobody", 401),
        f"forbid-{tag}": (CAROL, 403),
    }
    try:
        with httpx.Client(base_url=g.url, timeout=30) as c:
            for rid, (key, want) in cases.items():
                r = c.post(
                    "/v1/chat/completions",
                    json=CHAT,
                    headers={
                        "authorization": f"Bearer {key}",
                        "prefer": "respond-async",
                        "x-request-id": rid,
                    },
                )
                assert r.status_code == want, r.text
                assert r.headers["x-request-id"] == rid
                audit = g.wait_audit(rid)
                assert audit["status"] == want, audit
            job = c.get(
                r.headers.get("location", "/v1/jobs/none"), headers={"authorization": f"Bearer {ALICE}"}
            )
            assert job.status_code in (200, 404)

        def rows() -> dict[str, int]:
            found = run_sql(SHARED_DSN, "SELECT request_id, status FROM events", schema=schema)
            got = {r["request_id"]: r["status"] for r in found if r["request_id"] in cases}
            return got if len(got) == len(cases) else {}

        got = wait_for(rows, 30, "a ledger row for every async submission")
        assert got == {rid: want for rid, (_, want) in cases.items()}
    finally:
        g.stop()
        sim.stop()
        drop_schema(SHARED_DSN, schema)


def _raw(port: int, head: bytes, body: bytes = b"", read: bool = True) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head + body)
        if not read:
            return b""
        out = b""
        while b"\r\n\r\n" not in out:
            got = s.recv(65536)
            if not got:
                break
            out += got
        return out


def test_batch_creation_bounds_and_decodes_its_body(tmp_path: Path) -> None:
    path, _ = jobs_config(tmp_path)
    cfg = yaml.safe_load(path.read_text())
    cfg.setdefault("server", {})["max_body_bytes"] = 100_000
    path.write_text(yaml.safe_dump(cfg))
    sim = Sim(None, "--model", "tiny")
    g = Gateway([sim.url], config=path)
    auth = {"authorization": f"Bearer {ALICE}"}
    try:
        # 1.5 GB announced: refused on the headers (before, the whole body was read into memory)
        head = (
            b"POST /v1/batches HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"authorization: Bearer " + ALICE.encode() + b"\r\ncontent-length: 1500000000\r\n\r\n"
        )
        reply = _raw(g.port, head, b"{")
        assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
        with httpx.Client(base_url=g.url, timeout=30) as c:
            # streamed without a length: refused once past the bound
            def endless() -> object:
                for _ in range(40):
                    yield b" " * 10_000

            r = c.post("/v1/batches", content=endless(), headers={**auth, "content-type": "application/json"})
            assert r.status_code == 413, r.text
            assert r.json()["error"]["type"] == "invalid_request_error"
            # a gzip body is decoded, as on the proxied endpoints (it was 400 invalid_json)
            up = c.post(
                "/v1/files",
                headers=auth,
                files={
                    "file": (
                        "in.jsonl",
                        b'{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"model":"tiny","messages":[{"role":"user","content":"x"}]}}\n',
                    )
                },
                data={"purpose": "batch"},
            )
            assert up.status_code == 200, up.text
            body = gzip.compress(
                b'{"input_file_id":"'
                + up.json()["id"].encode()
                + b'","endpoint":"/v1/chat/completions","completion_window":"24h"}'
            )
            r = c.post(
                "/v1/batches",
                content=body,
                headers={**auth, "content-type": "application/json", "content-encoding": "gzip"},
            )
            assert r.status_code == 200, r.text
            assert r.json()["object"] == "batch"
            poll(
                lambda: c.get(f"/v1/batches/{r.json()['id']}", headers=auth).json(),
                lambda b: b["status"] == "completed",
                60,
                "the batch made from a gzip body ran",
            )
            # a coding it cannot decode: 415, not a 400 about JSON
            r = c.post(
                "/v1/batches",
                content=b"\x00\x01",
                headers={**auth, "content-type": "application/json", "content-encoding": "br"},
            )
            assert r.status_code == 415, r.text
            # an upload is stored as its bytes arrive: a coded one is refused, not stored coded
            r = c.post(
                "/v1/files",
                headers={**auth, "content-encoding": "gzip"},
                files={"file": ("in.jsonl", b"{}\n")},
                data={"purpose": "batch"},
            )
            assert r.status_code == 415, r.text
            assert r.json()["error"]["code"] == "unsupported_media_type"
            listed = c.get("/v1/files", headers=auth).json()["data"]
            assert [f["id"] for f in listed if f["purpose"] == "batch"] == [up.json()["id"]]
    finally:
        g.stop()
        sim.stop()


def test_no_batch_line_starts_after_its_cancel_was_answered(tmp_path: Path) -> None:
    """Two replicas run a batch; one answers the cancel. The other looked at the batch's
    status less than a second before and, trusting that look, kept starting lines for up to
    half a second after the cancel was answered (53 in one run): each ran and was billed."""
    shared_server_or_fail()
    schema = new_schema_name()
    sim = Sim(None, "--model", "tiny", "--ttft", "0.02", "--itl", "0.005", "--max-num-seqs", "64")
    files = tmp_path / "shared-files"
    path, _ = jobs_config(tmp_path, files=files, concurrency=16)
    cfg = yaml.safe_load(path.read_text())
    cfg["ledger"] = ledger_section(schema, tmp_path / "spool")
    path.write_text(yaml.safe_dump(cfg))
    db_upgrade(path)
    a = Gateway([sim.url], config=path)
    b = Gateway([sim.url], config=path)
    try:
        ca = openai.OpenAI(base_url=a.v1, api_key=ALICE, max_retries=0)
        cb = openai.OpenAI(base_url=b.v1, api_key=ALICE, max_retries=0)
        f = ca.files.create(file=("in.jsonl", chat_lines(3000, max_tokens=3)), purpose="batch")
        batch = ca.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        poll(
            lambda: ca.batches.retrieve(batch.id),
            lambda x: x.request_counts is not None and x.request_counts.completed >= 200,
            120,
            "200 lines done",
        )
        for _ in range(3):  # keep replica A's cached look at the status fresh ("in_progress")
            ca.batches.retrieve(batch.id)
        cancelled = cb.batches.cancel(batch.id)
        answered = time.time()
        assert cancelled.status == "cancelling", cancelled
        done = poll(
            lambda: cb.batches.retrieve(batch.id),
            lambda x: x.status == "cancelled",
            60,
            "the batch cancelled",
        )
        ran = (done.request_counts.completed + done.request_counts.failed) if done.request_counts else 0

        def rows() -> list[dict[str, object]]:
            found = run_sql(
                SHARED_DSN,
                "SELECT extract(epoch FROM ts)::float8 AS t FROM events WHERE request_id LIKE 'batch_req_%'",
                schema=schema,
            )
            return found if len(found) >= ran else []

        found = wait_for(rows, 30, "a ledger row for every line that ran")
        # A line started just before the cancel enters the pipeline a moment later: 0.25 s of
        # slack for a busy machine; the fault started lines up to a second after.
        late = sorted(float(r["t"]) - answered for r in found if float(r["t"]) > answered + 0.25)
        assert late == [], f"{len(late)} lines started after the cancel was answered (s after it: {late[:5]})"
    finally:
        for g in (a, b):
            g.stop()
        sim.stop()
        drop_schema(SHARED_DSN, schema)


def test_a_backends_absurd_usage_is_not_charged(tmp_path: Path) -> None:
    """A backend reporting 3,000,000,001 tokens for a 10-token request filled the principal's
    token window and its team's monthly budget at once (and its ledger row was refused: int32).
    Figures past what the request could use (the model's context per sequence, max_tokens per
    sequence) are now ignored, the request estimated, and the backend named in a warning."""
    liar = Sim(None, "--model", "tiny", "--fault", "usage:3000000000,1")
    greedy = Sim(None, "--model", "greedy", "--fault", "usage:5,500")  # 500 tokens for max_tokens 10
    honest = Sim(None, "--model", "other")
    cfg = {
        "auth": {"api_keys": [{"key": "sk-usage-test", "subject": "u", "team": "t", "tier": "small"}]},
        "tiers": {"small": {"tokens_per_minute": 2000}},
        "backends": [
            {"url": liar.url, "models": ["tiny"]},
            {"url": greedy.url, "models": ["greedy"]},
            {"url": honest.url, "models": ["other"]},
        ],
    }
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(cfg))
    g = Gateway([], config=path)
    try:
        with httpx.Client(base_url=g.v1, timeout=30, headers={"authorization": "Bearer sk-usage-test"}) as c:
            body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
            for i, model in enumerate(("tiny", "greedy", "tiny", "greedy")):
                rid = f"liar-{i}"
                r = c.post("/chat/completions", json={**body, "model": model}, headers={"x-request-id": rid})
                assert r.status_code == 200, r.text
                audit = g.wait_audit(rid)
                assert 0 < audit["tokens_charged"] < 100, audit
            r = c.post("/chat/completions", json={**body, "model": "other"}, headers={"x-request-id": "ok"})
            assert r.status_code == 200, r.text
            assert int(r.headers["x-ratelimit-remaining-tokens"]) > 1000, r.headers
            usage = r.json()["usage"]
            audit = g.wait_audit("ok")
            assert audit["tokens_charged"] == usage["prompt_tokens"] + usage["completion_tokens"]  # exact
        assert any(
            "more tokens than the request could use" in str(rec.get("event")) for rec in g.log_records()
        )
    finally:
        g.stop()
        for s in (liar, greedy, honest):
            s.stop()


async def test_an_endless_jwks_document_is_read_only_up_to_its_bound() -> None:
    """The identity provider (or whatever answers its URL) streaming an endless key set: the
    fetch was read whole (httpx ``.json()``); now at most 1 MiB, then a failed fetch."""
    sent = 0

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        chunk = b" " * 65536
        try:
            writer.write(b'%x\r\n{"keys": [\r\n' % 10)
            while sent < 200_000_000:
                writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(endless, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = JwtSettings(algorithms=["RS256"], jwks_url=f"http://127.0.0.1:{port}/jwks.json")
    cache = JwksCache(settings, lambda: None)
    tracemalloc.start()
    try:
        await cache.start()  # a failed fetch is logged and kept trying later, never raised
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        await cache.stop()
        server.close()
    assert not cache._loaded
    assert peak < 8_000_000, peak
    assert sent < 50_000_000, sent  # the connection was dropped soon after the bound


def test_a_backend_refusing_the_gateways_credentials_is_not_blamed_on_the_client() -> None:
    """A backend's 401/403 (the gateway's api_key for it is wrong, or was rotated) reached the
    client as its own 401 `authentication_error`, and a 429 as its own rate limit, with no
    Retry-After and nothing counted against the replica."""
    sims = [Sim(None, "--model", "tiny"), Sim(None, "--model", "tiny")]
    g = Gateway([s.url for s in sims])
    try:
        for fault, status, code in (
            ("status:401", 502, "upstream_auth_error"),
            ("status:403", 502, "upstream_auth_error"),
            ("status:429", 503, "upstream_unavailable"),
        ):
            for s in sims:
                s.control(fault=fault)
            rid = f"refused-{fault[7:]}-{secrets.token_hex(3)}"
            r = httpx.post(g.v1 + "/chat/completions", json=CHAT, headers={"x-request-id": rid}, timeout=30)
            assert r.status_code == status, r.text
            assert r.json()["error"]["code"] == code, r.text
            assert r.json()["error"]["type"] == "server_error"
            if status == 503:
                assert r.headers["retry-after"] == "1"
            assert g.wait_audit(rid)["fault"] == "backend"
    finally:
        g.stop()
        for s in sims:
            s.stop()


def test_an_async_job_of_a_team_over_its_budget_is_refused_at_submission(tmp_path: Path) -> None:
    """The synchronous call was refused at once (429 budget_exceeded); the same request with
    Prefer: respond-async was accepted (202), took a job slot, and ended as a 429 result."""
    shared_server_or_fail()
    schema = new_schema_name()
    team = f"bt{secrets.token_hex(4)}"
    sim = Sim(None, "--model", "tiny")
    path, _ = jobs_config(tmp_path)
    cfg = yaml.safe_load(path.read_text())
    cfg["auth"]["api_keys"].append({"key": "sk-budget-team", "subject": "spender", "team": team})
    cfg["teams"][team] = {"budget": {"monthly_tokens": 1}}
    cfg["rate_limits"] = {"storage": "redis://127.0.0.1:6379/0"}
    cfg["ledger"] = ledger_section(schema, tmp_path / "spool")
    path.write_text(yaml.safe_dump(cfg))
    db_upgrade(path)
    g = Gateway([sim.url], config=path)
    try:
        with httpx.Client(base_url=g.v1, timeout=30, headers={"authorization": "Bearer sk-budget-team"}) as c:
            assert c.post("/chat/completions", json=CHAT).status_code == 200  # spends the month
            assert c.post("/chat/completions", json=CHAT).status_code == 429
            r = c.post("/chat/completions", json=CHAT, headers={"prefer": "respond-async"})
            assert r.status_code == 429, r.text
            assert r.json()["error"]["code"] == "budget_exceeded"
            assert int(r.headers["retry-after"]) > 0
            r = c.post(
                "/batches",
                json={
                    "input_file_id": "file-x",
                    "endpoint": "/v1/chat/completions",
                    "completion_window": "24h",
                },
            )
            assert r.status_code == 429, r.text
            assert r.json()["error"]["code"] == "budget_exceeded"
    finally:
        g.stop()
        sim.stop()
        drop_schema(SHARED_DSN, schema)
        redis.Redis().delete(*(redis.Redis().keys(f"*budget:{team}:*") or ["-"]))
