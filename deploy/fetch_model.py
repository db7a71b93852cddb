#!/usr/bin/env python3
"""Fetch model weights to local disk before vLLM starts (fetch-then-serve). Standard library only.

    fetch_model.py SOURCE DEST [options]

SOURCE is one of
  hf://org/repo[@revision]   the Hugging Face Hub, through the `hf` CLI (huggingface_hub)
  s3://bucket/prefix         S3, through `aws s3 sync` (the AWS CLI)
  https://mirror/path/       a controlled HTTP mirror of the model directory (http:// only to a
                             loopback address, or with --allow-http)

DEST is the local model directory vLLM is then started on (`--model DEST`).

What it guarantees when it exits 0: DEST holds config.json (valid JSON) and every safetensors shard
(those named by model.safetensors.index.json, or at least one *.safetensors), each complete: its
size is exactly what its own header says. A marker file (.fetch-complete.json) records the source;
the next run with the same source re-checks the files and skips the download.

Transient failures (HTTP 429 and 5xx, connection errors, time-outs, truncated transfers) are
retried with exponential backoff and full jitter, honouring Retry-After; interrupted HTTP downloads
resume with a Range request. Permanent ones (401, 403, 404, ...) are not retried.

A mirror directory may carry fetch-manifest.json, {"files": [{"path", "size", "sha256"}]}, written
by `fetch_model.py --make-manifest DIR`: every file is then checked for size and sha256. Without
it, the fetcher asks for config.json, model.safetensors.index.json (and the shards it names) or
model.safetensors, and the usual tokenizer files (absent ones are skipped).

Exit codes:
  0  DEST holds a complete copy (downloaded now, or already there)
  2  usage error (bad arguments, unsupported source)
  3  the source refused or does not have the model (HTTP 4xx other than 408/429; not found,
     access denied, gated repository); not retried
  4  transient failures went on past the retry budget (429/5xx/network/truncated transfer)
  5  the files arrived but are not a complete model (missing config.json, missing or truncated
     shard, checksum mismatch)
  6  a required tool is missing (`hf` for hf://, `aws` for s3://)
  7  local problem: DEST unwritable, disk full, lock timeout, DEST holds a different model

Every setting has an environment variable (FETCH_MODEL_<OPTION>), so a container can be configured
by environment alone; flags win over the environment.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import fnmatch
import hashlib
import http.client
import ipaddress
import json
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_SOURCE = 3
EXIT_RETRIES = 4
EXIT_INCOMPLETE = 5
EXIT_TOOL = 6
EXIT_LOCAL = 7

MARKER = ".fetch-complete.json"
LOCK = ".fetch.lock"
MANIFEST = "fetch-manifest.json"
INDEX = "model.safetensors.index.json"
# What vLLM needs from a repository; skips duplicate *.bin / *.pt / *.gguf weights.
DEFAULT_INCLUDE = ("*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken")
# Tried on a mirror without a manifest; only config.json and the weights are required.
OPTIONAL_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "preprocessor_config.json",
)
RETRY_STATUS = {408, 429} | set(range(500, 600))
CHUNK = 1 << 20
MAX_HEADER = 100 * 1024 * 1024


class FetchError(Exception):
    """Ends the run with `code` and a one-line message."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class NotFound(FetchError):
    """HTTP 404 from the mirror: an optional file may be absent."""


class Transient(Exception):
    """Worth another attempt; `retry_after` is the server's hint in seconds."""

    def __init__(self, message: str, retry_after: float | None = None, code: int = EXIT_RETRIES) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.code = code  # the exit code if the retry budget runs out


def log(message: str) -> None:
    print(f"fetch-model: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- configuration


@dataclass
class Config:
    source: str
    dest: Path
    revision: str | None = None
    attempts: int = 8
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    timeout: float = 60.0
    include: tuple[str, ...] = DEFAULT_INCLUDE
    force: bool = False
    verify_only: bool = False
    lock_timeout: float = 3600.0
    allow_http: bool = False
    http_token: str | None = field(default=None, repr=False)


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"FETCH_MODEL_{name}", default)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="fetch_model.py",
        description="Fetch model weights to local disk before vLLM starts.",
        epilog="Exit codes: 0 ok, 2 usage, 3 source refused/not found, 4 retries exhausted, "
        "5 incomplete model, 6 tool missing, 7 local problem.",
    )
    p.add_argument("source", nargs="?", default=_env("SOURCE"), help="hf://org/repo, s3://b/p, https://")
    p.add_argument("dest", nargs="?", default=_env("DEST"), help="local model directory")
    p.add_argument("--revision", default=_env("REVISION"), help="hf:// revision (branch, tag, commit)")
    p.add_argument(
        "--retries",
        type=int,
        default=int(_env("RETRIES", "8") or 8),
        help="attempts per download, first included (default 8)",
    )
    p.add_argument("--backoff-base", type=float, default=float(_env("BACKOFF_BASE", "1") or 1))
    p.add_argument("--backoff-max", type=float, default=float(_env("BACKOFF_MAX", "60") or 60))
    p.add_argument("--timeout", type=float, default=float(_env("TIMEOUT", "60") or 60), help="socket timeout")
    p.add_argument(
        "--include",
        action="append",
        default=None,
        help=f"file pattern to fetch (repeatable; default {' '.join(DEFAULT_INCLUDE)})",
    )
    p.add_argument("--force", action="store_true", default=_env("FORCE") == "1", help="ignore the marker")
    p.add_argument("--verify-only", action="store_true", help="only check DEST; exit 0 or 5")
    p.add_argument("--lock-timeout", type=float, default=float(_env("LOCK_TIMEOUT", "3600") or 3600))
    p.add_argument(
        "--allow-http",
        action="store_true",
        default=_env("ALLOW_HTTP") == "1",
        help="allow plain http:// to a non-loopback mirror",
    )
    p.add_argument("--make-manifest", metavar="DIR", help=f"write DIR/{MANIFEST} for a mirror and exit")
    return p.parse_args(argv)


def build_config(ns: argparse.Namespace) -> Config:
    if not ns.source or not ns.dest:
        raise FetchError(EXIT_USAGE, "usage: fetch_model.py SOURCE DEST (or FETCH_MODEL_SOURCE/_DEST)")
    if ns.retries < 1 or ns.backoff_base < 0 or ns.backoff_max < 0 or ns.timeout <= 0:
        raise FetchError(EXIT_USAGE, "--retries must be >= 1, backoff >= 0, --timeout > 0")
    include = tuple(ns.include) if ns.include else tuple((_env("INCLUDE") or "").split()) or DEFAULT_INCLUDE
    return Config(
        source=ns.source.strip(),
        dest=Path(ns.dest),
        revision=ns.revision,
        attempts=ns.retries,
        backoff_base=ns.backoff_base,
        backoff_max=ns.backoff_max,
        timeout=ns.timeout,
        include=include,
        force=ns.force,
        verify_only=ns.verify_only,
        lock_timeout=ns.lock_timeout,
        allow_http=ns.allow_http,
        http_token=_env("HTTP_TOKEN"),
    )


# --------------------------------------------------------------------------- retry


def backoff_delay(attempt: int, cfg: Config, retry_after: float | None) -> float:
    """Full jitter: uniform(0, min(max, base * 2**(attempt-1))), at least the server's Retry-After."""
    ceiling = min(cfg.backoff_max, cfg.backoff_base * (2 ** (attempt - 1)))
    delay = random.uniform(0, ceiling)
    if retry_after is not None:
        delay = max(delay, min(retry_after, cfg.backoff_max))
    return delay


def with_retries(what: str, cfg: Config, action: Any) -> Any:
    for attempt in range(1, cfg.attempts + 1):
        try:
            return action()
        except Transient as exc:
            if attempt == cfg.attempts:
                raise FetchError(exc.code, f"{what}: giving up after {cfg.attempts} attempts: {exc}") from exc
            delay = backoff_delay(attempt, cfg, exc.retry_after)
            log(f"{what}: {exc}; attempt {attempt}/{cfg.attempts}, retrying in {delay:.2f}s")
            time.sleep(delay)
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- verification


def shard_problem(path: Path) -> str | None:
    """None when the safetensors file is exactly as long as its header says, else what is wrong."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path.name}: truncated ({size} bytes, no header)"
            (header_len,) = struct.unpack("<Q", head)
            if header_len > MAX_HEADER or 8 + header_len > size:
                return (
                    f"{path.name}: truncated or not safetensors (header of {header_len} bytes, file {size})"
                )
            header = json.loads(f.read(header_len))
    except FileNotFoundError:
        return f"{path.name}: missing"
    except (OSError, ValueError) as exc:
        return f"{path.name}: unreadable header ({exc})"
    if not isinstance(header, dict):
        return f"{path.name}: header is not a JSON object"
    end = 0
    for name, tensor in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(tensor["data_offsets"][1]))
        except (KeyError, IndexError, TypeError, ValueError):
            return f"{path.name}: tensor {name} has no data_offsets"
    expected = 8 + header_len + end
    if size < expected:
        return f"{path.name}: truncated ({size} of {expected} bytes)"
    if size > expected:
        return f"{path.name}: {size - expected} bytes more than its header describes"
    return None


def verify_model_dir(dest: Path) -> tuple[list[str], dict[str, int]]:
    """Problems found (empty when complete) and the checked files with their sizes."""
    problems: list[str] = []
    files: dict[str, int] = {}
    config = dest / "config.json"
    try:
        if not isinstance(json.loads(config.read_text()), dict):
            problems.append("config.json: not a JSON object")
        files["config.json"] = config.stat().st_size
    except FileNotFoundError:
        problems.append("config.json: missing")
    except (OSError, ValueError) as exc:
        problems.append(f"config.json: unreadable ({exc})")
    index = dest / INDEX
    shards: list[str]
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
            files[INDEX] = index.stat().st_size
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            return [*problems, f"{INDEX}: unreadable ({exc})"], files
        if not shards:
            problems.append(f"{INDEX}: names no shards")
    else:
        shards = sorted(p.name for p in dest.glob("*.safetensors"))
        if not shards:
            problems.append("no *.safetensors weights (and no model.safetensors.index.json)")
    for shard in shards:
        problem = shard_problem(dest / shard)
        if problem:
            problems.append(problem)
        else:
            files[shard] = (dest / shard).stat().st_size
    return problems, files


def read_marker(dest: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((dest / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_marker(dest: Path, cfg: Config, files: dict[str, int]) -> None:
    data = {
        "source": source_identity(cfg),
        "files": files,
        "completed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    tmp = dest / (MARKER + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, dest / MARKER)


def source_identity(cfg: Config) -> str:
    if cfg.source.startswith("hf://") and cfg.revision and "@" not in cfg.source:
        return f"{cfg.source}@{cfg.revision}"
    return cfg.source.rstrip("/")


# --------------------------------------------------------------------------- HTTP mirror


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _retry_after(headers: Any) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


class Mirror:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.base = cfg.source if cfg.source.endswith("/") else cfg.source + "/"

    def _request(self, rel: str, offset: int = 0) -> Any:
        url = urllib.parse.urljoin(self.base, urllib.parse.quote(rel))
        req = urllib.request.Request(url, headers={"User-Agent": "llm-gateway-fetch-model/1"})
        if self.cfg.http_token:
            # Unredirected: the token is never forwarded to a host the mirror redirects to.
            req.add_unredirected_header("Authorization", f"Bearer {self.cfg.http_token}")
        if offset:
            req.add_header("Range", f"bytes={offset}-")
        try:
            return urllib.request.urlopen(req, timeout=self.cfg.timeout)
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code in RETRY_STATUS:
                raise Transient(f"HTTP {exc.code} for {rel}", _retry_after(exc.headers)) from exc
            if exc.code == 416 and offset:
                raise
            if exc.code == 404:
                raise NotFound(EXIT_SOURCE, f"{url}: HTTP 404 {exc.reason}") from exc
            raise FetchError(EXIT_SOURCE, f"{url}: HTTP {exc.code} {exc.reason}") from exc
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            raise Transient(f"{rel}: {reason}") from exc

    def get_small(self, rel: str) -> bytes | None:
        """A small file's bytes, or None when the mirror does not have it (404)."""

        def once() -> bytes | None:
            try:
                resp = self._request(rel)
            except NotFound:
                return None
            with resp:
                body: bytes = _read_all(resp, rel)
                return body

        result: bytes | None = with_retries(rel, self.cfg, once)
        return result

    def download(self, rel: str, target: Path, size: int | None, sha256: str | None) -> None:
        part = target.with_name(target.name + ".part")
        target.parent.mkdir(parents=True, exist_ok=True)

        def once() -> None:
            offset = part.stat().st_size if part.exists() else 0
            if size is not None and offset > size:
                part.unlink()
                offset = 0
            try:
                resp = self._request(rel, offset)
            except urllib.error.HTTPError:  # 416 on a resume: start over
                part.unlink(missing_ok=True)
                raise Transient(f"{rel}: range not satisfiable, restarting") from None
            with resp:
                status = resp.status
                if offset and status != 206:
                    offset = 0  # the server ignored the Range: rewrite from the start
                length = resp.headers.get("Content-Length")
                expected = offset + int(length) if length is not None else None
                with part.open("ab" if offset else "wb") as out:
                    got = offset
                    while True:
                        try:
                            chunk = resp.read(CHUNK)
                        except (OSError, http.client.HTTPException) as exc:
                            raise Transient(f"{rel}: connection lost after {got} bytes ({exc})") from exc
                        if not chunk:
                            break
                        out.write(chunk)
                        got += len(chunk)
            if expected is not None and got < expected:
                raise Transient(f"{rel}: truncated transfer ({got} of {expected} bytes), will resume")
            if size is not None and got != size:
                part.unlink()
                raise Transient(f"{rel}: size {got} but the manifest says {size}", code=EXIT_INCOMPLETE)
            if sha256 is not None and _sha256(part) != sha256.lower():
                part.unlink()
                raise Transient(f"{rel}: sha256 mismatch", code=EXIT_INCOMPLETE)
            os.replace(part, target)

        with_retries(rel, self.cfg, once)


def _read_all(resp: Any, rel: str) -> bytes:
    try:
        body: bytes = resp.read()
    except (OSError, http.client.HTTPException) as exc:
        raise Transient(f"{rel}: connection lost ({exc})") from exc
    length = resp.headers.get("Content-Length")
    if length is not None and len(body) < int(length):
        raise Transient(f"{rel}: truncated transfer ({len(body)} of {length} bytes)")
    return body


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _safe_rel(rel: str) -> str:
    p = Path(rel)
    if not rel or p.is_absolute() or ".." in p.parts:
        raise FetchError(EXIT_SOURCE, f"refusing unsafe path from the source: {rel!r}")
    return p.as_posix()


def _wanted(rel: str, include: tuple[str, ...]) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(name, pat) or fnmatch.fnmatch(rel, pat) for pat in include)


def fetch_http(cfg: Config) -> None:
    parsed = urllib.parse.urlsplit(cfg.source)
    if parsed.scheme == "http" and not (cfg.allow_http or _is_loopback(parsed.hostname or "")):
        raise FetchError(EXIT_USAGE, "plain http:// only to a loopback mirror; use https:// or --allow-http")
    mirror = Mirror(cfg)
    raw = mirror.get_small(MANIFEST)
    entries: list[tuple[str, int | None, str | None]] = []
    if raw is not None:
        try:
            listed = json.loads(raw)["files"]
            entries = [(_safe_rel(f["path"]), f.get("size"), f.get("sha256")) for f in listed]
        except (ValueError, KeyError, TypeError) as exc:
            raise FetchError(EXIT_SOURCE, f"{MANIFEST}: malformed ({exc})") from exc
        entries = [e for e in entries if _wanted(e[0], cfg.include)]
        log(f"manifest lists {len(entries)} files")
        need = sum(s or 0 for rel, s, _ in entries if not _have(cfg.dest / rel, s, None))
        _check_space(cfg.dest, need)
        for rel, size, sha in entries:
            target = cfg.dest / rel
            if _have(target, size, sha):
                log(f"{rel}: already complete")
                continue
            log(f"{rel}: downloading" + (f" ({size} bytes)" if size is not None else ""))
            mirror.download(rel, target, size, sha)
        return
    log(f"no {MANIFEST} on the mirror: fetching config.json, the weights and tokenizer files")
    for rel in ("config.json", INDEX, *OPTIONAL_FILES):
        body = mirror.get_small(rel)
        if body is None:
            if rel == "config.json":
                raise FetchError(EXIT_SOURCE, f"{cfg.source}: config.json not found (HTTP 404)")
            continue
        _write_atomic(cfg.dest / rel, body)
    index = cfg.dest / INDEX
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise FetchError(EXIT_INCOMPLETE, f"{INDEX}: malformed ({exc})") from exc
    else:
        shards = ["model.safetensors"]
    for rel in map(_safe_rel, shards):
        target = cfg.dest / rel
        if target.exists() and shard_problem(target) is None:
            log(f"{rel}: already complete")
            continue
        log(f"{rel}: downloading")
        mirror.download(rel, target, None, None)


def _have(target: Path, size: int | None, sha: str | None) -> bool:
    if not target.is_file() or (size is not None and target.stat().st_size != size):
        return False
    if size is None and sha is None:
        return False
    return sha is None or _sha256(target) == sha.lower()


def _write_atomic(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, target)


def _check_space(dest: Path, need: int) -> None:
    free = shutil.disk_usage(dest).free
    if need > free:
        raise FetchError(EXIT_LOCAL, f"{dest}: {need} bytes to download but only {free} free")


# --------------------------------------------------------------------------- hf:// and s3://

# How a tool's last lines are read: a 429/5xx or a network word means "try again" even when a
# permanent-looking word is also there; otherwise a not-found/denied word means "stop"; anything
# else unknown is retried (the budget bounds it).
TRANSIENT_RE = re.compile(
    r"\b(429|5\d\d)\b|Too Many Requests|SlowDown|RequestTimeout|timed? ?out|Temporary|"
    r"Connection (reset|refused|aborted)|cannot be accessed|ServiceUnavailable|InternalError",
    re.IGNORECASE,
)
PERMANENT_RE = re.compile(
    r"\b(401|403|404)\b|RepositoryNotFound|RevisionNotFound|EntryNotFound|GatedRepo|AccessDenied|"
    r"NoSuchBucket|NoSuchKey|InvalidAccessKeyId|SignatureDoesNotMatch|ExpiredToken"
)


def run_tool(what: str, cmd: list[str], cfg: Config, env: dict[str, str]) -> None:
    def once() -> None:
        log(f"{what}: running {' '.join(cmd)}")
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        except OSError as exc:
            raise FetchError(EXIT_TOOL, f"{cmd[0]}: cannot run ({exc})") from exc
        tail = " | ".join((proc.stderr or proc.stdout or "").strip().splitlines()[-3:])
        if proc.returncode == 0:
            # `hf download` exits 0 when the Hub cannot be reached and returns the local directory
            # as it is: only a complete copy counts as success.
            problems, _ = verify_model_dir(cfg.dest)
            if not problems:
                return
            code = EXIT_RETRIES if TRANSIENT_RE.search(tail) else EXIT_INCOMPLETE
            raise Transient(f"{cmd[0]} exited 0 but {problems[0]} ({tail or 'no output'})", code=code)
        if not TRANSIENT_RE.search(tail) and PERMANENT_RE.search(tail):
            raise FetchError(EXIT_SOURCE, f"{what}: {cmd[0]} exited {proc.returncode}: {tail}")
        raise Transient(f"{cmd[0]} exited {proc.returncode}: {tail}")

    with_retries(what, cfg, once)


def fetch_hf(cfg: Config) -> None:
    spec = cfg.source[len("hf://") :].strip("/")
    repo, _, rev = spec.partition("@")
    revision = rev or cfg.revision or "main"
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise FetchError(EXIT_USAGE, f"{cfg.source}: expected hf://org/repo[@revision]")
    env = dict(os.environ, HF_HUB_DISABLE_PROGRESS_BARS="1")
    if hf := shutil.which("hf"):
        cmd = [hf, "download", repo, "--revision", revision, "--local-dir", str(cfg.dest)]
        for pattern in cfg.include:
            cmd += ["--include", pattern]
    elif legacy := shutil.which("huggingface-cli"):
        cmd = [legacy, "download", repo, "--revision", revision, "--local-dir", str(cfg.dest)]
        cmd += ["--include", *cfg.include]
    else:
        raise FetchError(EXIT_TOOL, "hf:// needs the `hf` CLI (pip install huggingface_hub) on PATH")
    run_tool(f"hf://{repo}@{revision}", cmd, cfg, env)


def fetch_s3(cfg: Config) -> None:
    if not urllib.parse.urlsplit(cfg.source).netloc:
        raise FetchError(EXIT_USAGE, f"{cfg.source}: expected s3://bucket/prefix")
    aws = shutil.which("aws")
    if not aws:
        raise FetchError(EXIT_TOOL, "s3:// needs the AWS CLI (`aws`) on PATH")
    cmd = [aws, "s3", "sync", cfg.source.rstrip("/") + "/", str(cfg.dest), "--no-progress"]
    cmd += ["--only-show-errors", "--exclude", "*"]
    for pattern in cfg.include:
        cmd += ["--include", pattern]
    env = dict(os.environ)
    env.setdefault("AWS_RETRY_MODE", "adaptive")
    env.setdefault("AWS_MAX_ATTEMPTS", "5")
    run_tool(cfg.source, cmd, cfg, env)


# --------------------------------------------------------------------------- main


@contextlib.contextmanager
def dest_lock(dest: Path, timeout: float) -> Iterator[None]:
    """One fetcher per DEST (pods on one node share a host-path cache)."""
    fd = os.open(dest / LOCK, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        deadline = time.monotonic() + timeout
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited:
                    log(f"{dest}: another fetch holds the lock; waiting")
                    waited = True
                if time.monotonic() > deadline:
                    raise FetchError(EXIT_LOCAL, f"{dest}: lock still held after {timeout:.0f}s") from None
                time.sleep(0.2)
        yield
    finally:
        os.close(fd)


def run(cfg: Config) -> int:
    if cfg.verify_only:
        problems, _ = verify_model_dir(cfg.dest)
        for p in problems:
            log(f"incomplete: {p}")
        log("complete" if not problems else f"{cfg.dest}: not a complete model")
        return EXIT_INCOMPLETE if problems else EXIT_OK
    scheme = cfg.source.split("://", 1)[0].lower() if "://" in cfg.source else ""
    fetchers = {"hf": fetch_hf, "s3": fetch_s3, "https": fetch_http, "http": fetch_http}
    if scheme not in fetchers:
        raise FetchError(EXIT_USAGE, f"{cfg.source}: unsupported source (hf://, s3://, https://)")
    try:
        cfg.dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FetchError(EXIT_LOCAL, f"{cfg.dest}: cannot create ({exc.strerror})") from exc
    with dest_lock(cfg.dest, cfg.lock_timeout):
        marker = read_marker(cfg.dest)
        if marker and not cfg.force:
            if marker.get("source") != source_identity(cfg):
                raise FetchError(
                    EXIT_LOCAL,
                    f"{cfg.dest} holds {marker.get('source')}, not {source_identity(cfg)}: "
                    "use another directory or --force",
                )
            problems, files = verify_model_dir(cfg.dest)
            if not problems and files == marker.get("files"):
                log(f"{cfg.dest}: complete copy of {marker['source']} already present; nothing to fetch")
                return EXIT_OK
            log(f"{cfg.dest}: marker present but the copy is not complete ({'; '.join(problems)}); fetching")
        (cfg.dest / MARKER).unlink(missing_ok=True)
        started = time.monotonic()
        fetchers[scheme](cfg)
        problems, files = verify_model_dir(cfg.dest)
        if problems:
            for p in problems:
                log(f"incomplete: {p}")
            raise FetchError(EXIT_INCOMPLETE, f"{cfg.dest}: the fetched model is not complete")
        write_marker(cfg.dest, cfg, files)
        total = sum(files.values())
        log(
            f"{cfg.dest}: complete ({len(files)} files checked, {total / 1e9:.2f} GB) "
            f"in {time.monotonic() - started:.1f}s"
        )
    return EXIT_OK


def make_manifest(directory: Path) -> int:
    entries = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel in (MANIFEST, MARKER, LOCK) or rel.startswith("."):
            continue
        entries.append({"path": rel, "size": path.stat().st_size, "sha256": _sha256(path)})
    (directory / MANIFEST).write_text(json.dumps({"files": entries}, indent=2) + "\n")
    log(f"{directory / MANIFEST}: {len(entries)} files")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    try:
        if ns.make_manifest:
            return make_manifest(Path(ns.make_manifest))
        return run(build_config(ns))
    except FetchError as exc:
        log(f"error: {exc}")
        return exc.code
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            log(f"error: disk full: {exc}")
        else:
            log(f"error: local I/O: {exc}")
        return EXIT_LOCAL
    except KeyboardInterrupt:
        log("interrupted; partial downloads resume next time")
        return 130


if __name__ == "__main__":
    sys.exit(main())
