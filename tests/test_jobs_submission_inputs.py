"""What an async submission reads from its request: ``Prefer`` and the ``Idempotency-Key``.

* ``Prefer`` is parsed as RFC 7240 says (comma-separated preferences, ``token[=value]`` with
  ``;`` parameters, the token case-insensitive, several ``Prefer`` headers): before, any header
  containing ``respond-async`` (``no-respond-async``, a parameter or a quoted value) made a job.
* An ``Idempotency-Key`` names one request: every input that changes what runs counts, the task
  type header too (it routes to another model). Before, the same key and body with another
  ``x-task-type`` returned the earlier job (work for another model).

Real processes (two simulators, a gateway), real Redis (127.0.0.1:6379, a prefix of the test's
own), httpx.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import yaml

from tests.jobs_helpers import ALICE, Pair, jobs_config, poll
from tests.procs import Gateway, Sim

TERMINAL_STATES = ("completed", "failed", "expired", "cancelled")
BODY = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def sims() -> Iterator[tuple[Sim, Sim]]:
    tiny = Sim(None, "--model", "tiny", "--ttft", "0.01", "--itl", "0.001")
    big = Sim(None, "--model", "big", "--ttft", "0.01", "--itl", "0.001")
    yield tiny, big
    tiny.stop()
    big.stop()


@pytest.fixture(scope="module")
def gw(sims: tuple[Sim, Sim], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("submission-inputs")
    path, prefix = jobs_config(tmp)
    cfg = yaml.safe_load(path.read_text())
    cfg["backends"] = [{"url": s.url} for s in sims]
    cfg["routing"] = {"routes": {"heavy": {"model": "big"}}}  # x-task-type: heavy runs on `big`
    path.write_text(yaml.safe_dump(cfg))
    p = Pair(path, prefix, tmp / "files", replicas=1)
    yield p.a
    p.stop()


def _post(g: Gateway, headers: list[tuple[str, str]], body: dict[str, Any] = BODY) -> httpx.Response:
    return httpx.post(
        g.v1 + "/chat/completions",
        json=body,
        headers=[("Authorization", f"Bearer {ALICE}"), *headers],
        timeout=30,
    )


@pytest.mark.parametrize(
    "prefer",
    [
        ["respond-async"],
        ["RESPOND-ASYNC"],
        ["Respond-Async; foo=bar"],
        ["wait=10, respond-async"],
        ['return=minimal; note="a, b", respond-async ,  handling=lenient'],
        ["wait=5", "respond-async"],  # two Prefer headers
        ["respond-async=", "wait=5"],
    ],
)
def test_a_respond_async_preference_makes_a_job(gw: Gateway, prefer: list[str]) -> None:
    r = _post(gw, [("Prefer", v) for v in prefer])
    assert r.status_code == 202, (prefer, r.status_code, r.text)
    assert r.headers["preference-applied"] == "respond-async"


@pytest.mark.parametrize(
    "prefer",
    [
        ["no-respond-async"],  # before: 202
        ["respond-asynchronously"],
        ['return="respond-async"'],  # a quoted value, not a preference
        ["return=respond-async"],
        ["handling=lenient; respond-async"],  # a parameter of another preference
        ['note="x, respond-async"'],  # a comma inside a quoted string
        ["x-respond-async, wait=3"],
    ],
)
def test_anything_else_is_answered_synchronously(gw: Gateway, prefer: list[str]) -> None:
    r = _post(gw, [("Prefer", v) for v in prefer])
    assert r.status_code == 200, (prefer, r.status_code, r.text)
    assert r.json()["object"] == "chat.completion" and "preference-applied" not in r.headers


def _job(g: Gateway, jid: str) -> dict[str, Any]:
    r = httpx.get(g.v1 + f"/jobs/{jid}", headers={"Authorization": f"Bearer {ALICE}"}, timeout=30)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def test_an_idempotency_key_reused_with_another_task_type_is_refused(gw: Gateway) -> None:
    async_ = [("Prefer", "respond-async"), ("Idempotency-Key", "task-key-1")]
    first = _post(gw, async_)
    assert first.status_code == 202, first.text
    # Same key, same body, another task type (it runs on `big`): another request.
    other = _post(gw, [*async_, ("x-task-type", "heavy")])
    assert other.status_code == 422, other.text  # before: 202 with the first job (on `tiny`)
    err = other.json()["error"]
    assert (err["code"], err["param"]) == ("idempotency_key_reused", "Idempotency-Key"), err
    # The retry of the first submission still gets its job.
    again = _post(gw, async_)
    assert again.status_code == 202 and again.json()["id"] == first.json()["id"], again.text
    done = poll(lambda: _job(gw, first.json()["id"]), lambda j: j["status"] in TERMINAL_STATES, 20, "job")
    assert done["response"]["body"]["model"] == "tiny", done

    # A key first used with a task type: its retry with it returns its job; without it, 422.
    heavy = [("Prefer", "respond-async"), ("Idempotency-Key", "task-key-2"), ("x-task-type", "heavy")]
    made = _post(gw, heavy)
    assert made.status_code == 202, made.text
    assert _post(gw, heavy).json()["id"] == made.json()["id"]
    plain = _post(gw, heavy[:2])
    assert plain.status_code == 422 and plain.json()["error"]["code"] == "idempotency_key_reused"
    done = poll(lambda: _job(gw, made.json()["id"]), lambda j: j["status"] in TERMINAL_STATES, 20, "job")
    assert done["response"]["body"]["model"] == "big", done
