"""Faults a batch survives: a replica SIGKILLed, Redis restarted, the only backend down.

Real gateway processes, a real simulator, and (where Redis must stop) a redis-server of the
test's own with appendonly on.
"""

from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path

import openai
import redis

from tests.jobs_helpers import ALICE, chat_lines, jobs_config, jsonl, poll, private_redis
from tests.procs import Gateway, Sim, free_port, until


def client(g: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=g.v1, api_key=ALICE, max_retries=2)


def exactly_once(c: openai.OpenAI, done: object, n: int) -> None:
    ids: Counter[str] = Counter()
    for fid in (getattr(done, "output_file_id", None), getattr(done, "error_file_id", None)):
        if fid:
            ids.update(x["custom_id"] for x in jsonl(c.files.content(fid).content))
    assert set(ids) == {f"req-{i}" for i in range(n)}, f"missing: {n - len(ids)}"
    assert max(ids.values()) == 1, [k for k, v in ids.items() if v > 1][:10]


def test_replica_sigkilled_mid_batch_loses_nothing(tmp_path: Path) -> None:
    sim = Sim(None, "--model", "tiny", "--ttft", "0.01", "--itl", "0.01", "--max-num-seqs", "64")
    files = tmp_path / "shared-files"  # one file store for both replicas (a shared volume)
    path, prefix = jobs_config(tmp_path, files=files, visibility_timeout=2, concurrency=8)
    a = Gateway([sim.url], config=path)
    b = Gateway([sim.url], config=path)
    try:
        ca = client(a)
        f = ca.files.create(file=("in.jsonl", chat_lines(500, max_tokens=6)), purpose="batch")
        batch = ca.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        poll(
            lambda: ca.batches.retrieve(batch.id),
            lambda x: x.request_counts is not None and x.request_counts.completed >= 100,
            120,
            "100 lines done",
        )
        a.proc.stop(signal.SIGKILL)
        cb = client(b)
        done = poll(
            lambda: cb.batches.retrieve(batch.id),
            lambda x: x.status in ("completed", "failed", "expired"),
            180,
            "batch completed on the surviving replica",
        )
        assert done.status == "completed", done
        assert done.request_counts is not None
        assert done.request_counts.completed == 500 and done.request_counts.failed == 0, done.request_counts
        exactly_once(cb, done, 500)
        assert redis.Redis().xlen(f"{prefix}q:tiny") == 0  # every line acknowledged
    finally:
        for g in (a, b):
            if g.proc.alive():
                g.stop()
        sim.stop()


def test_replica_sigkilled_while_queueing_a_batch_queues_each_line_once(tmp_path: Path) -> None:
    """The replica validating a batch dies after queueing part of it; another replica resumes
    the batch (its validation lock goes stale) and must not queue those lines again: each would
    run, and be charged, twice (5,000 queue entries for 4,000 lines before the fix)."""
    n = 4000
    sim = Sim(None, "--model", "tiny", "--ttft", "0", "--itl", "0", "--max-num-seqs", "64")
    files = tmp_path / "shared-files"
    path, prefix = jobs_config(tmp_path, files=files, visibility_timeout=2, concurrency=8)
    a = Gateway([sim.url], config=path)
    b = Gateway([sim.url], config=path)
    r = redis.Redis()
    try:
        ca = client(a)
        f = ca.files.create(file=("in.jsonl", chat_lines(n, max_tokens=1)), purpose="batch")
        batch = ca.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        entries, record = f"{prefix}batch:{batch.id}:entries", f"{prefix}batch:{batch.id}"
        # A polls as tight as it can: the kill must land while A is still queueing.
        until(lambda: r.llen(entries) >= 500, timeout=60, interval=0.001, what="first lines queued")
        a.proc.stop(signal.SIGKILL)
        queued_before = r.llen(entries)
        assert r.hget(record, "status") == b"validating" and queued_before < n, (
            "A finished queueing before it was killed: the test proves nothing",
            queued_before,
        )
        cb = client(b)
        done = poll(
            lambda: cb.batches.retrieve(batch.id),
            lambda x: x.status in ("completed", "failed", "expired"),
            240,
            "batch completed on the surviving replica",
        )
        assert done.status == "completed", done
        assert done.request_counts is not None and done.request_counts.completed == n, done.request_counts
        exactly_once(cb, done, n)
        added = r.xinfo_stream(f"{prefix}q:tiny")["entries-added"]
        assert (r.llen(entries), added) == (n, n), f"queued {added} entries for {n} lines"
    finally:
        for g in (a, b):
            if g.proc.alive():
                g.stop()
        sim.stop()


def test_redis_restarted_mid_batch(tmp_path: Path) -> None:
    sim = Sim(None, "--model", "tiny", "--ttft", "0.02", "--itl", "0.02")
    with private_redis(tmp_path) as rs:
        path, _ = jobs_config(tmp_path, queue=rs.url, visibility_timeout=3, concurrency=4)
        g = Gateway([sim.url], config=path)
        try:
            c = client(g)
            f = c.files.create(file=("in.jsonl", chat_lines(120, max_tokens=4)), purpose="batch")
            batch = c.batches.create(
                input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            poll(
                lambda: c.batches.retrieve(batch.id),
                lambda x: x.request_counts is not None and x.request_counts.completed >= 20,
                60,
                "20 lines done",
            )
            rs.stop()
            rs.start()
            done = poll(
                lambda: c.batches.retrieve(batch.id),
                lambda x: x.status in ("completed", "failed", "expired"),
                120,
                "batch completed after Redis came back",
            )
            assert done.status == "completed", done
            assert done.request_counts is not None and done.request_counts.completed == 120
            exactly_once(c, done, 120)
        finally:
            g.stop()
            sim.stop()


def test_backend_failing_every_request_dead_letters_with_a_clear_error(tmp_path: Path) -> None:
    sim = Sim(None, "--model", "tiny", "--fault", "status:500")
    path, prefix = jobs_config(tmp_path, max_deliveries=2)
    g = Gateway([sim.url], config=path)
    try:
        c = client(g)
        done = None
        f = c.files.create(file=("in.jsonl", chat_lines(3)), purpose="batch")
        b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        done = poll(
            lambda: c.batches.retrieve(b.id),
            lambda x: x.status in ("completed", "failed", "expired"),
            120,
            "batch ended",
        )
        assert done.status == "completed", done
        assert done.request_counts is not None and done.request_counts.failed == 3
        assert done.error_file_id and not done.output_file_id
        errs = jsonl(c.files.content(done.error_file_id).content)
        assert len(errs) == 3
        for e in errs:
            assert e["response"] is None
            assert e["error"]["code"] == "max_deliveries"
            assert "delivered 2 times" in e["error"]["message"]
        dlq = redis.Redis().xrange(f"{prefix}dlq")
        assert len(dlq) == 3
    finally:
        g.stop()
        sim.stop()


def test_backend_never_up_expires_the_batch_with_partial_output(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: never ready
    path, _ = jobs_config(tmp_path)
    g = Gateway([dead], config=path, wait_ready=False)
    try:
        c = client(g)
        f = c.files.create(file=("in.jsonl", chat_lines(4)), purpose="batch")
        b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="5s")
        done = poll(
            lambda: c.batches.retrieve(b.id),
            lambda x: x.status in ("completed", "failed", "expired"),
            60,
            "batch expired",
        )
        assert done.status == "expired", done
        assert done.expired_at
        errs = jsonl(c.files.content(done.error_file_id or "").content)
        assert sorted(e["custom_id"] for e in errs) == [f"req-{i}" for i in range(4)]
        assert {e["error"]["code"] for e in errs} == {"batch_expired"}
    finally:
        g.stop()
