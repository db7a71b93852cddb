"""The one check of a Redis URL in the config (``limits.storage``, ``jobs.queue``, ``cache.storage``).

redis-py's ``from_url`` takes a malformed URL quietly (``redis://h:6379/abc`` is database 0) or
fails only when the first connection is made, as a traceback; the config refuses it at load
time instead, so ``check-config`` names the key.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from redis.connection import parse_url


def check_redis_url(url: str) -> str:
    """``url`` unchanged when it is ``redis://`` or ``rediss://`` with a host, a port from 1 to
    65535 if given, and a database number if a path is given; ``ValueError`` saying what is
    wrong otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError("must be a redis:// or rediss:// URL (redis://host:6379/0)")
    try:
        port = parts.port  # ValueError when it is not a number in range
    except ValueError:
        raise ValueError("the port must be a number from 1 to 65535") from None
    if not parts.hostname:
        raise ValueError("the URL names no host (redis://host:6379/0)")
    if port == 0:
        raise ValueError("the port must be a number from 1 to 65535")
    db = parts.path.lstrip("/")
    if db and not (db.isascii() and db.isdigit()):
        raise ValueError(f"the path must be a database number (/0), not /{db}")
    try:
        parse_url(url)  # type: ignore[no-untyped-call]  # its query options (?db=, ?socket_timeout=...) as the client will read them
    except ValueError as exc:
        raise ValueError(str(exc)) from None
    return url
