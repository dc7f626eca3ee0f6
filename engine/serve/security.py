"""What stands between the UI's one write path (labels) and other web pages.

The server has no authentication; it is safe on 127.0.0.1 because nothing
else can reach it, as long as a page from another site cannot make the
browser talk to it:

- every request's Host must name the bound host, localhost or 127.0.0.1
  (Jupyter's defence against DNS rebinding: a rebinding domain resolves to
  127.0.0.1 but its requests carry its own name as Host);
- a write must carry the per-server random token the pages embed (another
  site cannot read our pages, so it cannot know it), and when the browser
  sends an Origin it must be this server's;
- request bodies are bounded before they are read.
"""

from __future__ import annotations

import hmac
import json
import secrets
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

TOKEN_HEADER = "x-reelsift-token"
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
WRITE_METHODS = ("POST", "PUT", "PATCH", "DELETE")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def new_token() -> str:
    return secrets.token_urlsafe(32)


def host_name(value: str) -> str:
    """The host part of a Host header or an Origin's authority ("[::1]:80" -> "::1")."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class Guard:
    """ASGI middleware: Host check on every request; token, Origin and body
    size on writes (see the module docstring)."""

    def __init__(self, app: Callable[..., Awaitable[None]], *, bound_host: str, token: str, max_body: int,
                 extra_hosts: Iterable[str] = (), any_host: bool = False) -> None:
        self.app = app
        # Bound to every interface with serve.allow_remote: the machine is
        # reached by names and addresses we cannot list, so any Host goes (as
        # Jupyter's allow_remote_access); the token still guards writes.
        self.any_host = any_host
        self.token = token
        self.max_body = max_body
        self.hosts = {host_name(h) for h in (bound_host, *LOCAL_NAMES, *extra_hosts) if h}
        self.hosts.discard("0.0.0.0")
        self.hosts.discard("::")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host", "")
        if not self.any_host and host_name(host) not in self.hosts:
            await _refuse(send, 403, f"Host {host!r} is not this server's (DNS rebinding?); open it as "
                                     "http://127.0.0.1:PORT/ or the host it was bound to")
            return
        if scope["method"] in WRITE_METHODS:
            origin = headers.get("origin")
            if origin is not None and (origin == "null" or host_name(origin.split("://", 1)[-1]) != host_name(host)):
                await _refuse(send, 403, f"cross-origin write from {origin!r} refused")
                return
            if not hmac.compare_digest(headers.get(TOKEN_HEADER, ""), self.token):
                await _refuse(send, 403, f"a write needs the page's token in the {TOKEN_HEADER} header")
                return
            length = headers.get("content-length")
            try:
                too_big = length is not None and int(length) > self.max_body
            except ValueError:
                await _refuse(send, 400, "bad Content-Length")
                return
            if too_big:
                await _refuse(send, 413, f"request body over {self.max_body} bytes")
                return
            receive = _bounded(receive, self.max_body)
        try:
            await self.app(scope, receive, send)
        except BodyTooLarge:
            await _refuse(send, 413, f"request body over {self.max_body} bytes")


class BodyTooLarge(Exception):
    pass


def _bounded(receive: Receive, limit: int) -> Receive:
    """`receive`, raising BodyTooLarge once more than `limit` bytes came (a
    chunked body has no Content-Length to check first)."""
    seen = 0

    async def wrapped() -> dict[str, Any]:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLarge
        return message

    return wrapped


async def _refuse(send: Send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
