"""No-auth loopback mode: only this machine's own clients, not a browser tricked into calling.

A gateway without authentication binds loopback only (gateway/config.py), but a web page the
user visits can still reach a loopback port through the user's browser: by DNS rebinding (the
attacker's name re-resolves to 127.0.0.1, so the request carries ``Host: attacker.example``)
or by a cross-site request a browser sends without a CORS preflight (a form POST, or
``fetch`` with ``Content-Type: text/plain``). Like Redis's protected mode, this mode then
accepts only:

* a ``Host`` naming loopback (``localhost``, ``127.0.0.0/8``, ``[::1]``, any port): else 421;
* no ``Origin``, or a loopback one: else 403;
* for a POST, ``Content-Type: application/json``, which a cross-site page cannot send without
  a preflight this gateway never answers: else 403 (DELETE, PUT and PATCH always need that
  preflight, so they are not checked: ``DELETE /v1/cache`` needs no body; a file upload to
  ``/v1/files`` may be ``multipart/form-data`` when it carries an ``Authorization`` header,
  which needs the same preflight).

The probes (``/live``, ``/ready``, ``/health``, ``/metrics``) too: they only read, but what they
say (backend URLs, models, traffic) is not a web page's business, and a gateway bound to
loopback has no remote prober to keep them open for (a container's health check asks
``127.0.0.1``). With authentication configured none of this runs: a credential is what a
browser lacks, and probes answer any Host.
"""

from __future__ import annotations

import ipaddress

from gateway.asgi import Scope
from gateway.errors import GatewayError, InvalidRequest, send_error

# The one method with a body that a page may send cross-site without a CORS preflight (Fetch
# standard, "CORS-safelisted method"): DELETE, PUT and PATCH always need one, never answered here.
_SIMPLE_WITH_BODY = "POST"


class MisdirectedRequest(GatewayError):
    status = 421
    type = "invalid_request_error"
    code = "host_not_allowed"
    reason = "auth"


class CrossSiteRefused(GatewayError):
    status = 403
    type = "permission_error"
    code = "cross_site_request"
    reason = "auth"


def is_loopback_host(host: str) -> bool:
    """``localhost``, a 127.0.0.0/8 address or ``[::1]``, each with an optional numeric port."""
    host = host.lower()
    if host.startswith("["):
        end = host.find("]")
        if end < 0 or (host[end + 1 :] and not _port(host[end + 1 :])):
            return False
        name = host[1:end]
        try:
            return ipaddress.IPv6Address(name).is_loopback
        except ValueError:
            return False
    name, colon, port = host.partition(":")
    if colon and not _port(":" + port):
        return False
    if name in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.IPv4Address(name).is_loopback
    except ValueError:
        return False


def _port(text: str) -> bool:
    return len(text) > 1 and text[0] == ":" and text[1:].isascii() and text[1:].isdigit() and len(text) <= 6


def refusal(scope: Scope) -> GatewayError | None:
    """Why this request must be refused in no-auth loopback mode, or None."""
    host = origin = content_type = None
    authorization = False
    for key, value in scope["headers"]:
        if key == b"host":
            if host is not None:  # RFC 9112 §3.2: a request with more than one Host is a 400
                return InvalidRequest("The request has more than one Host header.", param=None)
            host = value
        elif key == b"origin":
            if origin is not None:
                return InvalidRequest("The request has more than one Origin header.", param=None)
            origin = value
        elif key == b"content-type":
            if content_type is not None:  # a singleton field: which copy would count is a guess
                return InvalidRequest("The request has more than one Content-Type header.", param=None)
            content_type = value
        elif key == b"authorization":
            authorization = True
    if host is None or not is_loopback_host(host.decode("latin-1")):
        return MisdirectedRequest(
            "This gateway runs without authentication and answers only requests addressed to "
            "localhost, 127.0.0.1 or [::1]."
        )
    if origin is not None:
        scheme, sep, rest = origin.decode("latin-1").partition("://")
        if not sep or scheme.lower() not in ("http", "https") or not is_loopback_host(rest):
            return CrossSiteRefused(
                "This gateway runs without authentication and refuses requests from web pages "
                "that are not served from this machine (Origin)."
            )
    if scope["method"] == _SIMPLE_WITH_BODY:
        media = (content_type or b"").split(b";", 1)[0].strip().lower()
        # A file upload is multipart; a page can send that cross-site, but not together with an
        # Authorization header (not CORS-safelisted: a preflight, never answered here). The
        # OpenAI SDK always sends one.
        upload = media == b"multipart/form-data" and authorization and scope["path"] == "/v1/files"
        if media != b"application/json" and not upload:
            return CrossSiteRefused(
                "This gateway runs without authentication: send the body with "
                "`Content-Type: application/json` (a browser cannot send that cross-site "
                "without a preflight).",
                code="unsupported_content_type",
            )
    return None


send_refusal = send_error  # the OpenAI-shaped error response for a refused request
