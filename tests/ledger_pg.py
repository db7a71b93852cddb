"""PostgreSQL for the ledger tests: a fresh schema on the shared server, or a private server.

The shared server (127.0.0.1:5432, trust auth, database ``test``) gets one schema per test
module and process, dropped afterwards, so parallel runs never see each other's rows. A test
that stops PostgreSQL starts its own with ``initdb``/``pg_ctl`` (Debian's postgresql package)
in a temporary directory on a free port; as root, the server runs as the ``postgres`` user
(PostgreSQL refuses to run as root).
"""

from __future__ import annotations

import asyncio
import glob
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg

from tests.procs import ROOT, free_port, python_m

SHARED_DSN = os.environ.get("LEDGER_TEST_DSN", "postgresql://postgres@127.0.0.1:5432/test")


def run_sql(dsn: str, query: str, *args: Any, schema: str | None = None) -> list[asyncpg.Record]:
    """Rows of one query on a fresh connection (the tests are synchronous)."""

    async def go() -> list[asyncpg.Record]:
        settings = {"search_path": schema} if schema else {}
        conn = await asyncpg.connect(dsn, timeout=10, server_settings=settings)
        try:
            return list(await conn.fetch(query, *args))
        finally:
            await conn.close()

    return asyncio.run(go())


def shared_server_or_fail() -> None:
    """Fail (never skip) naming the service when the shared PostgreSQL is not there."""
    try:
        run_sql(SHARED_DSN, "SELECT 1")
    except (OSError, asyncpg.PostgresError) as exc:
        raise AssertionError(
            f"PostgreSQL is needed at {SHARED_DSN} (trust auth, database `test`): {exc}"
        ) from exc


def new_schema_name() -> str:
    return f"ledger_t{os.getpid()}_{secrets.token_hex(3)}"


def ledger_section(schema: str, spool_dir: Path, flush_interval: float = 0.2) -> dict[str, Any]:
    """A config's ``ledger`` section on the shared server, in ``schema``."""
    return {
        "dsn": SHARED_DSN,
        "schema_name": schema,
        "spool_dir": str(spool_dir),
        "flush_interval": flush_interval,
    }


def db_upgrade(config: Path) -> None:
    """``llm-gateway db upgrade --config <config>`` in a process of its own; fails the test when
    it fails."""
    out = subprocess.run(
        [*python_m("gateway"), "db", "upgrade", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr


def drop_schema(dsn: str, schema: str) -> None:
    run_sql(dsn, f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``condition`` until it returns something truthy; AssertionError naming ``what``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = condition()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.1)
    raise AssertionError(f"{what}: not after {timeout}s (last: {last!r})")


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise AssertionError(f"PostgreSQL's {name} is needed (apt-get install postgresql)")
    return found[-1]


class PrivatePostgres:
    """A PostgreSQL server of our own on a free port: stop and start it at will."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="ledger-pg-"))
        self.data = self.dir / "data"
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._as_postgres: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres")
            self._as_postgres = ["runuser", "-u", "postgres", "--"]
        self._run(_pg_bin("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        self.start()

    def _run(self, *args: str) -> None:
        out = subprocess.run([*self._as_postgres, *args], capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise AssertionError(f"{args[0]} failed: {out.stdout}\n{out.stderr}")

    def start(self) -> None:
        opts = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir} -c fsync=off"
        self._run(
            _pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "log"), "-o", opts, "-w", "start"
        )

    def stop(self) -> None:
        self._run(_pg_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def destroy(self) -> None:
        try:
            self.stop()
        except AssertionError:
            pass  # already stopped
        shutil.rmtree(self.dir, ignore_errors=True)
