"""The shell and Python blocks of the README and of docs/*.md work pasted as they are.

Convention (README.md, docs/*.md): an HTML comment on the line before a fenced block says how it
runs.

- ``<!-- readme-test: standalone -->``: the block starts what it needs (a simulator, a gateway).
- ``<!-- readme-test: with-gateway -->``: the block runs while a gateway and a simulator run as
  ``make run`` starts them (the gateway without auth in front of the simulator, async jobs and
  the response cache on, on the local Redis, which the test needs).
- ``<!-- readme-test: skip -->``: not run (say why in the README's text).

Every ```bash / ```sh block must carry one of them. Each block runs in a scratch directory that
holds the repository's ``examples/`` and this interpreter's ``.venv``, in a fresh bash with
``set -eo pipefail`` (so a failing step fails the block), on free ports: the README's 8080 and 8000
are rewritten to the gateway's and the simulator's ports of the run. What a block starts in the
background is stopped after it, by process group.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from tests.procs import ROOT, Gateway, Sim, free_port

MARK = re.compile(r"<!-- readme-test: (standalone|with-gateway|skip) -->")
FENCE = re.compile(r"^```(\w*)\s*$")
SHELLS = {"bash", "sh", "shell"}
ERROR_OBJECT = re.compile(r'"error"\s*:\s*\{')  # an error answer (a job's `"error": null` is not)
GATEWAY_PORT = "8080"
SIM_PORT = "8000"
TIMEOUT = 120  # seconds for one block, its own start-up of a simulator and gateway included


@dataclass(frozen=True)
class Block:
    doc: str  # README.md or docs/....md
    line: int  # 1-based line of the opening fence
    lang: str
    mode: str | None  # None: untagged
    text: str

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}-{self.lang}-{self.mode}"


DOCS = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]


def readme_blocks(doc: str = "README.md") -> list[Block]:
    """Every fenced block of ``doc`` with its language and the tag on the line before it."""
    lines = (ROOT / doc).read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        tag = MARK.fullmatch(lines[i - 1].strip()) if i > 0 else None
        mode = tag.group(1) if tag else None
        blocks.append(Block(doc, i + 1, opening.group(1), mode, "\n".join(lines[i + 1 : end]) + "\n"))
        i = end + 1
    return blocks


BLOCKS = [b for doc in DOCS for b in readme_blocks(doc)]
RUNNABLE = [b for b in BLOCKS if b.mode in ("standalone", "with-gateway")]


def test_every_shell_block_says_how_it_runs() -> None:
    untagged = [b.id for b in BLOCKS if b.lang in SHELLS and b.mode is None]
    assert not untagged, f"tag these with <!-- readme-test: standalone|with-gateway|skip -->: {untagged}"
    readme = [b for b in RUNNABLE if b.doc == "README.md"]
    assert any(b.mode == "standalone" for b in readme), "the Try it block is no longer tagged"
    assert any(b.mode == "with-gateway" for b in readme)
    assert any(b.doc == "docs/jobs.md" for b in RUNNABLE), "the jobs' examples are no longer tagged"


def rewrite_ports(text: str, gateway_port: int, sim_port: int) -> str:
    text = re.sub(rf"(?<!\d){GATEWAY_PORT}(?!\d)", str(gateway_port), text)
    return re.sub(rf"(?<!\d){SIM_PORT}(?!\d)", str(sim_port), text)


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    """A directory that looks like a checkout after ``make install`` to the README's commands."""
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    return tmp_path


@pytest.fixture(scope="module")
def make_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Sim, Gateway]]:
    """What ``make run`` starts with a Redis at hand (scripts/run-dev.sh): the simulator and, in
    front of it, the gateway without auth, async jobs and the response cache on; Redis keys of
    the test's own, removed after."""
    try:
        redis.Redis(socket_timeout=2).ping()
    except redis.RedisError as exc:
        pytest.fail(f"needs Redis at 127.0.0.1:6379, as `make run` does for jobs ({exc})")
    prefix = f"test:blocks:{secrets.token_hex(4)}:"
    env = {
        "GATEWAY_JOBS__ENABLED": "true",
        "GATEWAY_JOBS__KEY_PREFIX": prefix + "jobs:",
        "GATEWAY_JOBS__FILES": f"file://{tmp_path_factory.mktemp('files')}",
        "GATEWAY_CACHE__STORAGE": "redis://127.0.0.1:6379/0",
        "GATEWAY_CACHE__KEY_PREFIX": prefix + "cache:",
    }
    sim = Sim()
    try:
        gw = Gateway([sim.url], env=env)
    except BaseException:
        sim.stop()
        raise
    yield sim, gw
    gw.stop()
    sim.stop()
    r = redis.Redis()
    for key in r.scan_iter(match=prefix + "*"):
        r.delete(key)
    r.close()


def run_block(block: Block, cwd: Path, gateway_port: int, sim_port: int) -> subprocess.CompletedProcess[str]:
    """Run one block as pasted; anything it leaves running in the background is stopped after."""
    code = rewrite_ports(block.text, gateway_port, sim_port)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    # The README's serve commands rely on the default port 8080: on this run it is a free one.
    env["GATEWAY_SERVER__PORT"] = str(gateway_port)
    if block.lang in SHELLS:
        args = ["bash", "-c", "set -eo pipefail\n" + code]
    else:
        args = [str(Path(sys.prefix) / "bin" / "python"), "-c", code]
    proc = subprocess.Popen(
        args,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    timed_out = False
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        timed_out = True
        out, err = "", f"the block did not finish within {TIMEOUT} s"
    finally:
        stop_group(proc)
    return subprocess.CompletedProcess(args, -1 if timed_out else proc.returncode, out, err)


def stop_group(proc: subprocess.Popen[str], timeout: float = 15) -> None:
    """SIGTERM the block's process group (its background jobs; started here), wait until it is gone.

    Raises:
        AssertionError: something in the group outlived SIGTERM by ``timeout`` seconds (then killed).
    """
    pgid = proc.pid  # the block's shell leads its own session and process group
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.poll()  # reap the shell itself, or its zombie keeps the group alive
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.killpg(pgid, signal.SIGKILL)
    raise AssertionError(f"the block's background processes outlived SIGTERM by {timeout} s")


def logs(cwd: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(cwd.glob("*.log")))


@pytest.mark.parametrize("block", [b for b in RUNNABLE if b.mode == "standalone"], ids=lambda b: b.id)
def test_standalone_block(block: Block, scratch: Path) -> None:
    result = run_block(block, scratch, free_port(), free_port())
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{logs(scratch)}"
    assert result.stdout.strip(), "the block printed nothing"
    assert ERROR_OBJECT.search(result.stdout) is None, result.stdout


@pytest.mark.parametrize("block", [b for b in RUNNABLE if b.mode == "with-gateway"], ids=lambda b: b.id)
def test_block_with_a_running_gateway(block: Block, scratch: Path, make_run: tuple[Sim, Gateway]) -> None:
    sim, gw = make_run
    result = run_block(block, scratch, gw.port, sim.port)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert result.stdout.strip(), "the block printed nothing"
    assert ERROR_OBJECT.search(result.stdout) is None, result.stdout
