"""Redaction of secrets from text that a team chose to log (prompt/completion logging).

Conservative patterns: API keys, bearer tokens, JWTs, AWS access keys, private-key
blocks, `password=...`-style assignments, and long opaque tokens. What matches becomes
``[REDACTED]``; the rest of the text is kept.

Bounded work on hostile text, because this runs on the event loop: the text is cut to
``MAX_LOGGED_CHARS`` first, and every pattern is linear in the text's length. Python's
``re`` backtracks, so each pattern either starts only at the start of a run of its
characters (a look-behind), or consumes its run possessively (``*+``, ``{n,}+``) so that a
failed attempt is not retried from inside the same run; the few ambiguous spans are bounded
(``{0,40}``). A private-key header with no end marker redacts the rest of the text (a
truncated key is still a secret), so the search for an end marker runs at most once to the end.
"""

from __future__ import annotations

import re

MAX_LOGGED_CHARS = 16 * 1024
"""Characters of prompt or completion text logged per request; the rest is cut before redaction."""

_TOKEN = r"[\w-]"  # base64url, the alphabet of JWT segments and most provider keys
_PATTERNS = [
    re.compile(
        r"-----BEGIN [A-Z ]{0,40}PRIVATE KEY-----(?:.*?-----END [A-Z ]{0,40}PRIVATE KEY-----|.*+)",
        re.S,
    ),
    re.compile(rf"(?<!{_TOKEN})eyJ{_TOKEN}{{5,}}+\.{_TOKEN}{{5,}}+\.{_TOKEN}{{5,}}+"),  # JWT
    re.compile(rf"(?<!{_TOKEN})(?:sk|pk|rk|ghp|gho|xox[abp])[-_][A-Za-z0-9_-]{{12,}}+"),  # provider keys
    re.compile(r"(?<![A-Za-z0-9])AKIA[0-9A-Z]{16}(?![A-Za-z0-9])"),  # AWS access key id
    re.compile(r"(?i)(?<![\w-])bearer\s++[A-Za-z0-9._~+/-]{12,}+=*+"),
    re.compile(r"(?i)\b(password|passwd|pwd|secret|token|api[_-]?key)\b(\s*+[:=]\s*+)\S++"),
    re.compile(r"(?<![A-Za-z0-9+/_-])[A-Za-z0-9+/_-]{40,}+={0,2}"),  # long opaque tokens
]


def redact(text: str, limit: int = MAX_LOGGED_CHARS) -> str:
    """``text`` cut to ``limit`` characters (marked ``[truncated]``), secrets as ``[REDACTED]``."""
    if len(text) > limit:
        text = text[:limit] + " [truncated]"
    for p in _PATTERNS:
        if p.groups == 2:
            text = p.sub(lambda m: f"{m.group(1)}{m.group(2)}[REDACTED]", text)
        else:
            text = p.sub("[REDACTED]", text)
    return text
