"""The gate every request passes before any route: paths, Host/Origin, the token, body limits.

Path hygiene, DNS-rebinding and cross-site checks, the token, and body size limits (a plain
ASGI middleware, so streams and uploads pass through it unbuffered).

- Paths: NUL, backslash, `.`/`..` segments and still-encoded `%2e`/`%2f` after decoding -> 400.
- Without a token the server answers only requests whose Host is a loopback name (127.x, ::1,
  localhost): a DNS-rebinding page reaches it under its own host name -> 403. With or without a
  token, a request whose Origin is not the server's own (or whose Sec-Fetch-Site is cross-site)
  -> 403: no other site may drive it from a browser, and no CORS header is ever sent.
- With a token every route but the public ones needs it (the login route and the web page's own
  HTML/CSS/JS, which hold no data: the page then asks for the token): `Authorization: Bearer T`,
  HTTP Basic with T as the password (any user name: A1111's --api-auth clients), or the HttpOnly
  SameSite=Strict cookie the login route sets. Never in a URL. Compared in constant time.
- Bodies: Content-Length over the limit -> 413 at once; a chunked body is counted as it arrives.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from urllib.parse import urlsplit

from fastapi import HTTPException

from .settings import is_loopback_host

COOKIE = "ti_fast_session"
LOGIN_PATH = "/api/v1/login"
_ENCODED = re.compile(r"%(2e|2f|5c|00)", re.I)
SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"no-referrer"), (b"cross-origin-resource-policy", b"same-origin")]
CSP = b"default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; frame-ancestors 'none'"


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body over the {limit // (1 << 20)} MiB limit")


def session_value(token: str) -> str:
    """The login cookie's value: derived from the token (the token itself never sits in a cookie)."""
    return hmac.new(token.encode(), b"ti-fast serve session v1", hashlib.sha256).hexdigest()


def token_ok(headers: dict, token: str) -> bool:
    """Bearer, Basic password or the session cookie — any one."""
    auth = headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer" and hmac.compare_digest(value.encode(), token.encode()):
        return True
    if scheme.lower() == "basic":
        try:
            _, _, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        if hmac.compare_digest(password.encode(), token.encode()):
            return True
    for part in headers.get("cookie", "").split(";"):
        k, _, v = part.strip().partition("=")
        if k == COOKIE and hmac.compare_digest(v.encode(), session_value(token).encode()):
            return True
    return False


def host_of(value: str) -> str:
    """'127.0.0.1:7861' -> '127.0.0.1'; '[::1]:80' -> '::1'."""
    try:
        return urlsplit("//" + value).hostname or ""
    except ValueError:
        return ""


class Guard:
    def __init__(self, app, *, token: str | None, body_limit: int, upload_limit: int, upload_prefix: str,
                 public: frozenset = frozenset()):
        self.app, self.token = app, token
        self.public = frozenset(public) | {LOGIN_PATH}      # exact paths answered without the token
        self.body_limit, self.upload_limit, self.upload_prefix = body_limit, upload_limit, upload_prefix

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            if scope["type"] == "websocket":          # no websocket routes: refuse before anything
                await send({"type": "websocket.close", "code": 1008})
                return
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        refusal = self._check(scope, headers)
        if refusal is not None:
            return await _refuse(send, *refusal)
        limit = self.upload_limit if (scope["method"] == "POST" and scope["path"].startswith(self.upload_prefix)) \
            else self.body_limit
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await _refuse(send, 413, f"request body over the {limit // (1 << 20)} MiB limit")
        seen = 0

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        async def guarded_send(message):
            if message["type"] == "http.response.start":
                hdrs = [(k, v) for k, v in message.get("headers", []) if not k.lower().startswith(b"access-control-")]
                names = {k.lower() for k, _ in hdrs}
                hdrs += [h for h in SECURITY_HEADERS if h[0] not in names]
                if b"content-security-policy" not in names:
                    hdrs.append((b"content-security-policy", CSP))
                if b"cache-control" not in names:
                    hdrs.append((b"cache-control", b"no-store"))
                message = {**message, "headers": hdrs}
            await send(message)

        await self.app(scope, counted_receive, guarded_send)

    def _check(self, scope, headers: dict) -> tuple | None:
        """(status, message, extra headers) of a refusal, or None."""
        path = scope["path"]
        if "\x00" in path or "\\" in path or _ENCODED.search(path) or \
                any(seg in (".", "..") for seg in path.split("/")):
            return 400, "refused path: '..', '.', backslash and encoded separators are not allowed", []
        host = host_of(headers.get("host", ""))
        if self.token is None and not is_loopback_host(host):
            return 403, (f"Host {headers.get('host', '')!r} is not a loopback address: without --token this "
                         "server answers only 127.0.0.1/localhost (DNS rebinding guard)"), []
        origin = headers.get("origin")
        if origin is not None and origin != "null":
            o = urlsplit(origin)
            if self.token is None and not is_loopback_host(o.hostname or ""):
                return 403, f"Origin {origin!r}: cross-site requests are refused", []
            if o.netloc.lower() != headers.get("host", "").lower():
                return 403, f"Origin {origin!r} is not this server ({headers.get('host', '')}): cross-site requests are refused", []
        elif origin == "null":
            return 403, "Origin null: requests from sandboxed or file pages are refused", []
        if headers.get("sec-fetch-site") == "cross-site":
            return 403, "cross-site request refused", []
        if self.token is not None and path not in self.public and not token_ok(headers, self.token):
            # a browser opening a page gets the Basic prompt; scripts (fetch/XHR) just the 401
            navigate = headers.get("sec-fetch-mode", "navigate") == "navigate"
            challenge = b'Basic realm="ti-fast", charset="UTF-8"' if navigate else b'Bearer realm="ti-fast"'
            return 401, ("this server needs its token: Authorization: Bearer TOKEN, HTTP Basic with the token as "
                         "password, or POST /api/v1/login"), [(b"www-authenticate", challenge)]
        return None


async def _refuse(send, status: int, message: str, extra=()) -> None:
    body = json.dumps({"error": message, "detail": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *SECURITY_HEADERS, (b"cache-control", b"no-store"), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
