"""Jobs: credentials checked again at execution, Redis down at submission, no-auth uploads."""

from __future__ import annotations

import secrets
from pathlib import Path

import httpx
import openai
import yaml

from tests.jobs_helpers import ALICE, chat_lines, jobs_config, jsonl, poll, private_redis, sha
from tests.procs import Gateway, Sim, free_port


def test_a_key_revoked_before_its_lines_run_is_refused_at_execution(tmp_path: Path) -> None:
    files = tmp_path / "files"
    path, prefix = jobs_config(tmp_path, files=files)
    dead = f"http://127.0.0.1:{free_port()}"
    a = Gateway([dead], config=path, wait_ready=False)  # accepts, never runs (no replica ready)
    try:
        c = openai.OpenAI(base_url=a.v1, api_key=ALICE, max_retries=0)
        f = c.files.create(file=("in.jsonl", chat_lines(3)), purpose="batch")
        batch = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        poll(lambda: c.batches.retrieve(batch.id), lambda x: x.status == "in_progress", 30, "enqueued")
    finally:
        a.stop()
    cfg = yaml.safe_load(path.read_text())
    cfg["auth"]["api_keys"][0] = {"sha256": sha(ALICE), "subject": "alice", "team": "search", "revoked": True}
    revoked = tmp_path / "revoked.yaml"
    revoked.write_text(yaml.safe_dump(cfg))
    sim = Sim(None, "--model", "tiny")
    b = Gateway([sim.url], config=revoked)
    try:
        done = poll(lambda: redis_batch_status(prefix, batch.id), lambda s: s == "completed", 60, "completed")
        assert done == "completed"
        assert sim.stats()["received"] == 0  # refused before reaching the backend
        errs = redis_error_lines(prefix, batch.id)
        assert len(errs) == 3
        for e in errs:
            assert e["response"]["status_code"] == 401
            assert e["response"]["body"]["error"]["code"] == "invalid_api_key"
    finally:
        b.stop()
        sim.stop()


def redis_batch_status(prefix: str, bid: str) -> str | None:
    import redis

    v = redis.Redis().hget(f"{prefix}batch:{bid}", "status")
    return v.decode() if v is not None else None


def redis_error_lines(prefix: str, bid: str) -> list[dict[str, object]]:
    import orjson
    import redis

    return [orjson.loads(v) for v in redis.Redis().hvals(f"{prefix}batch:{bid}:err")]


def test_redis_down_at_submission_is_a_503_with_retry_after(tmp_path: Path) -> None:
    sim = Sim(None, "--model", "tiny")
    with private_redis(tmp_path) as rs:
        path, _ = jobs_config(tmp_path, queue=rs.url)
        g = Gateway([sim.url], config=path)
        try:
            h = {"Authorization": f"Bearer {ALICE}"}
            rs.stop()
            for r in (
                httpx.post(
                    g.v1 + "/batches",
                    json={
                        "input_file_id": "file-x",
                        "endpoint": "/v1/completions",
                        "completion_window": "24h",
                    },
                    headers=h,
                    timeout=30,
                ),
                httpx.get(g.v1 + "/batches", headers=h, timeout=30),
                httpx.post(
                    g.v1 + "/chat/completions",
                    json={"model": "tiny", "messages": [{"role": "user", "content": "x"}]},
                    headers={**h, "Prefer": "respond-async"},
                    timeout=30,
                ),
            ):
                assert r.status_code == 503, r.text
                assert r.json()["error"]["code"] == "jobs_unavailable"
                assert int(r.headers["retry-after"]) > 0
            # Interactive requests do not depend on the job queue.
            ok = httpx.post(
                g.v1 + "/chat/completions",
                json={"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2},
                headers=h,
                timeout=30,
            )
            assert ok.status_code == 200
        finally:
            g.stop()
            sim.stop()


def test_no_auth_loopback_mode_accepts_sdk_uploads_and_refuses_browser_forms(tmp_path: Path) -> None:
    sim = Sim(None, "--model", "tiny")
    prefix = f"test:jobs:{secrets.token_hex(4)}:"
    cfg = {"jobs": {"enabled": True, "key_prefix": prefix, "files": f"file://{tmp_path / 'files'}"}}
    path = tmp_path / "noauth.yaml"
    path.write_text(yaml.safe_dump(cfg))
    g = Gateway([sim.url], config=path)
    try:
        c = openai.OpenAI(base_url=g.v1, api_key="unused", max_retries=0)
        f = c.files.create(file=("in.jsonl", chat_lines(2)), purpose="batch")
        b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        done = poll(lambda: c.batches.retrieve(b.id), lambda x: x.status == "completed", 60, "completed")
        assert len(jsonl(c.files.content(done.output_file_id or "").content)) == 2
        # What a cross-site form can send: multipart without an Authorization header.
        form = httpx.post(g.v1 + "/files", files={"file": ("x.jsonl", b"{}\n")}, data={"purpose": "batch"})
        assert form.status_code == 403, form.text
    finally:
        g.stop()
        sim.stop()
