"""API keys for service-to-service callers, stored as sha256 hashes."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import yaml

from gateway.auth.principal import Principal
from gateway.config_auth import ApiKeySettings, AuthSettings


class ApiKeyError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def load_api_keys(settings: AuthSettings) -> list[ApiKeySettings]:
    keys = list(settings.api_keys)
    if settings.api_keys_file is not None:
        data = yaml.safe_load(Path(settings.api_keys_file).read_text()) or []
        if not isinstance(data, list):
            raise ValueError(f"{settings.api_keys_file}: expected a list of API keys")
        keys += [ApiKeySettings.model_validate(item) for item in data]
    return keys


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class ApiKeyStore:
    """Lookup by the key's sha256, then a constant-time comparison of the digests.

    The dict lookup is keyed by a hash, so its timing says nothing about the
    key; compare_digest makes the final equality check constant-time anyway.
    """

    def __init__(self, keys: list[ApiKeySettings], default_tier: str | None) -> None:
        self._by_digest: dict[bytes, tuple[bytes, Principal | None]] = {}
        self._by_owner: dict[tuple[str, str | None], Principal] = {}
        for k in keys:
            d = bytes.fromhex(k.sha256) if k.sha256 else digest(k.key.get_secret_value())  # type: ignore[union-attr]
            principal = (
                None
                if k.revoked
                else Principal(
                    subject=k.subject,
                    team=k.team,
                    tier=k.tier or default_tier,
                    scopes=frozenset(k.scopes),
                    models=frozenset(k.models) if k.models is not None else None,
                    via="api_key",
                    credential="key:" + d.hex()[:12],
                )
            )
            self._by_digest[d] = (d, principal)
            if principal is not None:
                self._by_owner.setdefault((principal.subject, principal.team), principal)

    def current(self, subject: str, team: str | None) -> Principal | None:
        """The principal a live (configured, not revoked) key gives ``subject`` in ``team`` now,
        or None: how a job submitted with a key is checked again when it runs."""
        return self._by_owner.get((subject, team))

    def __len__(self) -> int:
        return len(self._by_digest)

    def verify(self, key: str) -> Principal:
        d = digest(key)
        entry = self._by_digest.get(d)
        if entry is None or not hmac.compare_digest(entry[0], d):
            raise ApiKeyError("invalid_api_key", "The API key is not valid.")
        if entry[1] is None:
            raise ApiKeyError("revoked_api_key", "The API key has been revoked.")
        return entry[1]
