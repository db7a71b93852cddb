"""A tiny local identity provider for the auth tests: a JWKS served over HTTP on a free 127.0.0.1 port.

The test changes the published key set at will, counts the requests the gateway makes, and can
switch the IdP "off" (the connection is then dropped without a response, as a dead IdP would).
Keys are made with ``cryptography``; tokens are signed with python-jose, like a real IdP would.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jose import jwk
from jose import jwt as jose_jwt

JWKS_PATH = "/.well-known/jwks.json"


class SigningKey:
    """A private key with its kid; ``jwk()`` is the public half as a JWK, ``pem`` the public PEM."""

    def __init__(self, kind: str, kid: str, publish_alg: bool = True) -> None:
        self.kid = kid
        if kind == "RS256":
            private: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        elif kind == "ES256":
            private = ec.generate_private_key(ec.SECP256R1())
        else:
            raise ValueError(kind)
        self.alg = kind
        self.publish_alg = publish_alg
        self.private_pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        self.pem = (
            private.public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode()
        )

    def jwk(self) -> dict[str, Any]:
        data: dict[str, Any] = dict(jwk.construct(self.pem, self.alg).to_dict())
        data["kid"] = self.kid
        data["use"] = "sig"
        if not self.publish_alg:
            data.pop("alg", None)
        return data

    def sign(self, claims: dict[str, Any], headers: dict[str, Any] | None = None, kid: Any = ...) -> str:
        h: dict[str, Any] = {"kid": self.kid if kid is ... else kid, **(headers or {})}
        if h["kid"] is None:
            del h["kid"]
        token: str = jose_jwt.encode(claims, self.private_pem, algorithm=self.alg, headers=h)
        return token


class IdP:
    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.available = True
        self.requests = 0
        self._lock = threading.Lock()
        idp = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                with idp._lock:
                    idp.requests += 1
                    up, keys = idp.available, list(idp.keys)
                if not up:
                    self.close_connection = True  # drop it: no status line at all
                    return
                if self.path != JWKS_PATH:
                    self.send_error(404)
                    return
                body = json.dumps({"keys": keys}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port: int = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}{JWKS_PATH}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="idp", daemon=True)
        self._thread.start()

    def publish(self, *keys: SigningKey) -> None:
        with self._lock:
            self.keys = [k.jwk() for k in keys]

    @property
    def count(self) -> int:
        with self._lock:
            return self.requests

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
