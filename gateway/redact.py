"""Redaction of secrets from text that a team chose to log (prompt/completion logging).

Conservative patterns: API keys, bearer tokens, JWTs, AWS access keys, private-key
blocks, `password=...`-style assignments, and long opaque tokens. What matches becomes
``[REDACTED]``; the rest of the text is kept.
"""

from __future__ import annotations

import re

_PATTERNS = [
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----", re.S),
    re.compile(r"\beyJ[\w-]{5,}\.[\w-]{5,}\.[\w-]{5,}"),  # JWT
    re.compile(r"\b(?:sk|pk|rk|ghp|gho|xox[abp])[-_][A-Za-z0-9_-]{12,}"),  # provider API keys
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),  # AWS access key id
    re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/-]{12,}=*"),
    re.compile(r"(?i)\b(password|passwd|pwd|secret|token|api[_-]?key)\b(\s*[:=]\s*)\S+"),
    re.compile(r"\b[A-Za-z0-9+/_-]{40,}={0,2}"),  # long opaque tokens
]


def redact(text: str) -> str:
    for p in _PATTERNS:
        if p.groups == 2:
            text = p.sub(lambda m: f"{m.group(1)}{m.group(2)}[REDACTED]", text)
        else:
            text = p.sub("[REDACTED]", text)
    return text
