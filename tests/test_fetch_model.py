"""deploy/fetch_model.py, run for real against a local HTTP mirror of a fake model directory.

The mirror is an http.server on 127.0.0.1 whose handler can answer 429/503, cut a response short
(truncated transfer), honour Range requests (resume), and log every request. hf:// and s3:// run
the script with fake `hf` / `aws` executables first on PATH. Backoff is shortened by flags.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "deploy" / "fetch_model.py"
FAST = ["--retries", "5", "--backoff-base", "0.01", "--backoff-max", "0.05", "--timeout", "5"]


def safetensors_bytes(tensors: dict[str, int]) -> bytes:
    """A valid safetensors file: F32 tensors of the given element counts."""
    header: dict[str, object] = {}
    offset = 0
    for name, count in tensors.items():
        header[name] = {"dtype": "F32", "shape": [count], "data_offsets": [offset, offset + 4 * count]}
        offset += 4 * count
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + bytes(range(256)) * (offset // 256) + bytes(offset % 256)


def make_model(root: Path) -> dict[str, bytes]:
    files = {
        "config.json": json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 128}).encode(),
        "tokenizer.json": b'{"version": "1.0"}',
        "tokenizer_config.json": b'{"chat_template": "{{ messages }}"}',
        "model-00001-of-00002.safetensors": safetensors_bytes({"a": 4096, "b": 1024}),
        "model-00002-of-00002.safetensors": safetensors_bytes({"c": 2048}),
    }
    files["model.safetensors.index.json"] = json.dumps(
        {
            "metadata": {},
            "weight_map": {
                "a": "model-00001-of-00002.safetensors",
                "b": "model-00001-of-00002.safetensors",
                "c": "model-00002-of-00002.safetensors",
            },
        }
    ).encode()
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (root / name).write_bytes(data)
    return files


@dataclass
class Mirror:
    root: Path
    url: str
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    # path -> actions for the next requests: "429", "503", "truncate", "404" (then normal serving)
    faults: dict[str, list[str]] = field(default_factory=dict)

    def gets(self, name: str) -> int:
        return sum(1 for path, _ in self.requests if path == name)


def _handler(mirror: Mirror) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

        def do_GET(self) -> None:
            name = self.path.split("/models/tiny/", 1)[-1]
            mirror.requests.append((name, self.headers.get("Range")))
            pending = mirror.faults.get(name)
            action = pending.pop(0) if pending else "ok"
            if action in ("429", "503", "404"):
                body = b"slow down" if action != "404" else b"not found"
                self.send_response(int(action))
                if action != "404":
                    self.send_header("Retry-After", "0")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            path = mirror.root / name
            if not path.is_file():
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            data = path.read_bytes()
            start = 0
            rng = self.headers.get("Range")
            if rng and rng.startswith("bytes="):
                start = int(rng[6:].split("-")[0])
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            payload = data[start:]
            self.send_header("Content-Length", str(len(payload)))
            if action == "truncate":  # promise everything, send half, hang up
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(payload[: len(payload) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self.end_headers()
            self.wfile.write(payload)

    return Handler


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[Mirror]:
    root = tmp_path / "mirror"
    make_model(root)
    m = Mirror(root=root, url="")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(m))
    m.url = f"http://127.0.0.1:{server.server_address[1]}/models/tiny/"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield m
    server.shutdown()
    server.server_close()


def fetch(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env if env is not None else dict(os.environ),
    )


def manifest(mirror: Mirror) -> None:
    res = fetch("--make-manifest", str(mirror.root))
    assert res.returncode == 0, res.stderr


def same_files(dest: Path, src: Path) -> None:
    for path in src.iterdir():
        if path.name != "fetch-manifest.json":
            assert (dest / path.name).read_bytes() == path.read_bytes(), path.name


def test_429_then_success_with_manifest(mirror: Mirror, tmp_path: Path) -> None:
    manifest(mirror)
    mirror.faults = {
        "config.json": ["429", "429"],
        "model-00002-of-00002.safetensors": ["503"],
    }
    dest = tmp_path / "models" / "tiny"
    res = fetch(mirror.url, str(dest), *FAST)
    assert res.returncode == 0, res.stderr
    same_files(dest, mirror.root)
    assert mirror.gets("config.json") == 3
    assert mirror.gets("model-00002-of-00002.safetensors") == 2
    assert "HTTP 429 for config.json" in res.stderr and "retrying in" in res.stderr
    marker = json.loads((dest / ".fetch-complete.json").read_text())
    assert marker["source"] == mirror.url.rstrip("/")
    assert not list(dest.glob("*.part"))


def test_truncated_transfer_is_resumed(mirror: Mirror, tmp_path: Path) -> None:
    manifest(mirror)
    shard = "model-00001-of-00002.safetensors"
    mirror.faults = {shard: ["truncate"]}
    dest = tmp_path / "dest"
    res = fetch(mirror.url, str(dest), *FAST)
    assert res.returncode == 0, res.stderr
    same_files(dest, mirror.root)
    ranges = [r for path, r in mirror.requests if path == shard]
    assert ranges[0] is None and ranges[1] is not None and ranges[1].startswith("bytes=")
    assert "truncated transfer" in res.stderr or "connection lost" in res.stderr


def test_without_manifest_follows_the_index(mirror: Mirror, tmp_path: Path) -> None:
    mirror.faults = {"model.safetensors.index.json": ["429"]}
    dest = tmp_path / "dest"
    res = fetch(mirror.url, str(dest), *FAST)
    assert res.returncode == 0, res.stderr
    same_files(dest, mirror.root)
    assert "no fetch-manifest.json" in res.stderr


def test_second_run_skips_the_download(mirror: Mirror, tmp_path: Path) -> None:
    manifest(mirror)
    dest = tmp_path / "dest"
    assert fetch(mirror.url, str(dest), *FAST).returncode == 0
    before = len(mirror.requests)
    res = fetch(mirror.url, str(dest), *FAST)
    assert res.returncode == 0, res.stderr
    assert len(mirror.requests) == before  # not one request
    assert "already present" in res.stderr


def test_damaged_copy_is_fetched_again(mirror: Mirror, tmp_path: Path) -> None:
    manifest(mirror)
    dest = tmp_path / "dest"
    assert fetch(mirror.url, str(dest), *FAST).returncode == 0
    shard = dest / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])  # e.g. a node crash mid-copy
    res = fetch(mirror.url, str(dest), *FAST)
    assert res.returncode == 0, res.stderr
    assert "not complete" in res.stderr and "truncated" in res.stderr
    same_files(dest, mirror.root)
    assert mirror.gets("model-00001-of-00002.safetensors") == 1  # the good shard is kept


def test_truncated_file_at_the_source_fails_verification(mirror: Mirror, tmp_path: Path) -> None:
    shard = mirror.root / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-512])  # the mirror itself holds a cut file
    dest = tmp_path / "dest"
    res = fetch(mirror.url, str(dest), *FAST)
    assert res.returncode == 5, res.stderr
    assert "model-00001-of-00002.safetensors: truncated" in res.stderr
    assert not (dest / ".fetch-complete.json").exists()


def test_checksum_mismatch_is_retried_then_fails(mirror: Mirror, tmp_path: Path) -> None:
    manifest(mirror)
    data = json.loads((mirror.root / "fetch-manifest.json").read_text())
    data["files"][0]["sha256"] = hashlib.sha256(b"something else").hexdigest()
    (mirror.root / "fetch-manifest.json").write_text(json.dumps(data))
    res = fetch(mirror.url, str(tmp_path / "dest"), *FAST)
    assert res.returncode == 5, res.stderr
    assert "sha256 mismatch" in res.stderr and "giving up after 5 attempts" in res.stderr


def test_missing_config_json_in_the_manifest_fails(mirror: Mirror, tmp_path: Path) -> None:
    (mirror.root / "config.json").unlink()
    manifest(mirror)
    res = fetch(mirror.url, str(tmp_path / "dest"), *FAST)
    assert res.returncode == 5, res.stderr
    assert "config.json: missing" in res.stderr


def test_not_found_is_not_retried(mirror: Mirror, tmp_path: Path) -> None:
    res = fetch(mirror.url.replace("tiny", "nope"), str(tmp_path / "dest"), *FAST)
    assert res.returncode == 3, res.stderr
    assert "config.json not found" in res.stderr
    assert mirror.gets("config.json") == 0  # asked once for the manifest and config under /nope/


def test_persistent_503_exhausts_the_retries(mirror: Mirror, tmp_path: Path) -> None:
    mirror.faults = {"fetch-manifest.json": ["503"] * 10}
    res = fetch(mirror.url, str(tmp_path / "dest"), *FAST)
    assert res.returncode == 4, res.stderr
    assert mirror.gets("fetch-manifest.json") == 5


def test_concurrent_fetches_download_once(mirror: Mirror, tmp_path: Path) -> None:
    manifest(mirror)
    dest = tmp_path / "shared-cache"
    cmd = [sys.executable, str(SCRIPT), mirror.url, str(dest), *FAST]
    procs = [subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=60)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert mirror.gets("model-00001-of-00002.safetensors") == 1


def test_plain_http_to_a_remote_host_is_refused(tmp_path: Path) -> None:
    res = fetch("http://mirror.invalid/models/x/", str(tmp_path / "dest"), *FAST)
    assert res.returncode == 2
    assert "https://" in res.stderr


def test_other_model_in_dest_is_refused(mirror: Mirror, tmp_path: Path) -> None:
    manifest(mirror)
    dest = tmp_path / "dest"
    assert fetch(mirror.url, str(dest), *FAST).returncode == 0
    res = fetch(mirror.url + "other/", str(dest), *FAST)
    assert res.returncode == 7, res.stderr
    assert "holds" in res.stderr


def test_verify_only(mirror: Mirror, tmp_path: Path) -> None:
    assert fetch("--verify-only", "x", str(mirror.root)).returncode == 0
    (mirror.root / "model-00002-of-00002.safetensors").unlink()
    res = fetch("--verify-only", "x", str(mirror.root))
    assert res.returncode == 5 and "model-00002-of-00002.safetensors: missing" in res.stderr


def fake_tool(bin_dir: Path, name: str, fail_first: str, model: Path, dest_arg: str) -> Path:
    """A stand-in for `hf` / `aws`: logs its argv, fails once with `fail_first`, then copies `model`."""
    bin_dir.mkdir(exist_ok=True)
    log = bin_dir / f"{name}.log"
    script = bin_dir / name
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, shutil, sys\n"
        f"log = {str(log)!r}\n"
        "with open(log, 'a') as f: f.write(json.dumps(sys.argv[1:]) + '\\n')\n"
        "calls = sum(1 for _ in open(log))\n"
        f"if calls == 1 and {fail_first!r}:\n"
        f"    print({fail_first!r}, file=sys.stderr)\n"
        f"    sys.exit(0 if 'cannot be accessed' in {fail_first!r} else 1)\n"
        f"dest = {dest_arg}\n"
        f"shutil.copytree({str(model)!r}, dest, dirs_exist_ok=True)\n"
    )
    script.chmod(0o755)
    return log


def tool_env(bin_dir: Path) -> dict[str, str]:
    return dict(os.environ, PATH=f"{bin_dir}{os.pathsep}/nonexistent")


def test_hf_source_uses_the_hf_cli_with_retries(tmp_path: Path) -> None:
    model = tmp_path / "model"
    make_model(model)
    bin_dir = tmp_path / "bin"
    dest_arg = "sys.argv[sys.argv.index('--local-dir') + 1]"
    log = fake_tool(bin_dir, "hf", "HTTP Error 503: Service Unavailable", model, dest_arg)
    dest = tmp_path / "dest"
    res = fetch("hf://org/tiny@v1", str(dest), *FAST, env=tool_env(bin_dir))
    assert res.returncode == 0, res.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(calls) == 2
    assert calls[1][:6] == ["download", "org/tiny", "--revision", "v1", "--local-dir", str(dest)]
    assert "*.safetensors" in calls[1]
    same_files(dest, model)
    res = fetch("hf://org/tiny@v1", str(dest), *FAST, env=tool_env(bin_dir))
    assert res.returncode == 0 and len(log.read_text().splitlines()) == 2  # skipped


def test_hf_exit_0_without_files_is_retried(tmp_path: Path) -> None:
    """The real `hf download` exits 0 when the Hub is unreachable; the copy must be checked."""
    model = tmp_path / "model"
    make_model(model)
    bin_dir = tmp_path / "bin"
    message = "Returning existing local_dir as remote repo cannot be accessed (Connection refused)"
    dest_arg = "sys.argv[sys.argv.index('--local-dir') + 1]"
    log = fake_tool(bin_dir, "hf", message, model, dest_arg)
    res = fetch("hf://org/tiny", str(tmp_path / "dest"), *FAST, env=tool_env(bin_dir))
    assert res.returncode == 0, res.stderr
    assert "exited 0 but config.json: missing" in res.stderr
    assert len(log.read_text().splitlines()) == 2


def test_hf_not_found_is_not_retried(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    log = fake_tool(bin_dir, "hf", "RepositoryNotFoundError: 404 Client Error", tmp_path, "None")
    res = fetch("hf://org/missing", str(tmp_path / "dest"), *FAST, env=tool_env(bin_dir))
    assert res.returncode == 3, res.stderr
    assert len(log.read_text().splitlines()) == 1


def test_s3_source_uses_aws_s3_sync(tmp_path: Path) -> None:
    model = tmp_path / "model"
    make_model(model)
    bin_dir = tmp_path / "bin"
    log = fake_tool(bin_dir, "aws", "", model, "sys.argv[4]")
    dest = tmp_path / "dest"
    res = fetch("s3://bucket/models/tiny", str(dest), *FAST, env=tool_env(bin_dir))
    assert res.returncode == 0, res.stderr
    call = json.loads(log.read_text().splitlines()[0])
    assert call[:4] == ["s3", "sync", "s3://bucket/models/tiny/", str(dest)]
    same_files(dest, model)


def test_missing_tool_exit_code(tmp_path: Path) -> None:
    env = tool_env(tmp_path / "empty")
    assert fetch("hf://org/tiny", str(tmp_path / "a"), *FAST, env=env).returncode == 6
    assert fetch("s3://bucket/x", str(tmp_path / "b"), *FAST, env=env).returncode == 6


def test_usage_errors(tmp_path: Path) -> None:
    assert fetch("ftp://x/y", str(tmp_path / "d")).returncode == 2
    assert fetch().returncode == 2
    assert fetch("hf://just-a-name", str(tmp_path / "d")).returncode == 2
