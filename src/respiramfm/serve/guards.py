"""What protects ``respiramfm serve`` from slow, oversized, cross-site and idle clients.

ASGI middleware (inside the app, so every refusal is a JSON body with the
research-use notice):

* :class:`BodyLimit` -- request bodies over the size limit get a 413, and bodies
  that arrive too slowly (:attr:`ServerLimits.body_timeout` in all, or
  :attr:`ServerLimits.body_idle_timeout` between two chunks) get a 408; either
  way the body is cut off before it is parsed or spooled.
* :class:`OriginPolicy` -- a ``Host`` outside the allow-list is refused (400;
  it stops DNS-rebinding pages from reaching a local server), and a request with
  side effects (any method but GET/HEAD/OPTIONS) carrying an ``Origin`` that is
  neither the server's own origin nor in the allow-list is refused (403), so a
  web page a user happens to visit cannot submit recordings to it.
* :class:`SecurityHeaders` -- CSP, no sniffing, no framing, no referrer; and any
  redirect's ``Location`` made relative, so it is never built from the ``Host``
  header a client sent.

Connection level (uvicorn, h11): :class:`GuardedH11Protocol` closes a
connection whose request headers have not arrived within
:attr:`ServerLimits.header_timeout` (an idle connection, or a slowloris), and
refuses connections beyond :attr:`ServerLimits.max_connections` by closing them
at once; idle keep-alive connections close after
:attr:`ServerLimits.keep_alive_timeout`. :func:`server_config` puts it together.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Iterable
from urllib.parse import urlsplit

import anyio
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

#: Added to every JSON answer of the server.
NOTICE = "Research prototype: not a medical device and not a diagnosis."
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "media-src 'self' blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
       "frame-ancestors 'none'")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True)
class ServerLimits:
    """Connection and timing limits of the HTTP server (seconds, counts, bytes)."""

    header_timeout: float = 10.0  # from connection (or the previous response) to complete request headers
    body_timeout: float = 120.0  # the whole request body (a 20 MiB upload at 170 kB/s)
    body_idle_timeout: float = 15.0  # between two chunks of the body
    keep_alive_timeout: float = 5.0  # an idle connection between requests
    max_connections: int = 64  # open connections; more are closed on arrival
    max_header_bytes: int = 64 * 1024  # request line and headers

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not value > 0:
                raise ValueError(f"server limit {name} must be positive, got {value!r}")


def with_notice(body: dict) -> dict:
    return {**body, "notice": NOTICE}


async def send_json(send, status: int, body: dict) -> None:
    """A complete JSON answer (with the notice) that also closes the connection."""
    data = json.dumps(with_notice(body)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": data})


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` (JSON 413) or arriving too slowly (JSON 408).

    (FastAPI's own ``max_body_size`` answers some of these cases with a plain-text
    413; every refusal of this API is JSON, so the limit is enforced here.)

    A declared Content-Length is checked up front; a body is counted and timed as
    it arrives and cut off at the limit (the app then sees a disconnect, and
    whatever it answers is replaced by the refusal).
    """

    def __init__(self, app, max_bytes: int, timeout: float = ServerLimits.body_timeout,
                 idle_timeout: float = ServerLimits.body_idle_timeout):
        self.app, self.max_bytes = app, int(max_bytes)
        self.timeout, self.idle_timeout = float(timeout), float(idle_timeout)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_big = (413, {"error": "request_too_large", "detail": f"request body exceeds {self.max_bytes} bytes"})
        if declared is not None:
            try:
                n = int(declared)
            except ValueError:
                return await send_json(send, 400, {"error": "bad_request", "detail": "invalid Content-Length"})
            if n > self.max_bytes:
                return await send_json(send, *too_big)
        state = {"seen": 0, "cut": None, "started": False, "done": False}
        deadline = time.monotonic() + self.timeout

        async def counted_receive():
            if state["cut"]:
                return {"type": "http.disconnect"}
            if state["done"]:  # body complete: a later receive only waits for a disconnect
                return await receive()
            wait = min(self.idle_timeout, deadline - time.monotonic())
            with anyio.move_on_after(max(0.0, wait)) as scope_:
                msg = await receive()
            if scope_.cancelled_caught:
                state["cut"] = (408, {"error": "request_timeout",
                                      "detail": f"request body not received in time (limits: {self.timeout:g} s in "
                                                f"all, {self.idle_timeout:g} s between chunks)"})
                return {"type": "http.disconnect"}
            if msg["type"] == "http.request":
                state["seen"] += len(msg.get("body", b""))
                state["done"] = not msg.get("more_body", False)
                if state["seen"] > self.max_bytes:
                    state["cut"] = too_big
                    return {"type": "http.disconnect"}
            return msg

        async def guarded_send(msg):
            if state["cut"]:
                if not state["started"]:
                    state["started"] = True
                    await send_json(send, *state["cut"])
                return
            if msg["type"] == "http.response.start":
                state["started"] = True
            await send(msg)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not state["cut"]:
                raise
        if state["cut"] and not state["started"]:
            await send_json(send, *state["cut"])


def _hostname(host: str) -> str:
    """``example.org:8000`` -> ``example.org``; ``[::1]:8000`` -> ``[::1]`` (lower case)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.split(":", 1)[0]


class OriginPolicy:
    """Refuse unknown ``Host`` headers (when an allow-list is set) and cross-origin requests with side effects.

    ``allowed_hosts``: host names (no port) the server answers to; ``None`` accepts
    any. ``allowed_origins``: origins (``scheme://host[:port]``) allowed to POST
    besides the server's own.
    """

    def __init__(self, app, allowed_hosts: Iterable[str] | None = None, allowed_origins: Iterable[str] = ()):
        self.app = app
        self.allowed_hosts = None if allowed_hosts is None else {_hostname(h) for h in allowed_hosts}
        self.allowed_origins = {o.strip().lower().rstrip("/") for o in allowed_origins}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        host = headers.get(b"host", b"").decode("latin-1")
        if self.allowed_hosts is not None and _hostname(host) not in self.allowed_hosts:
            return await send_json(send, 400, {"error": "forbidden_host",
                                               "detail": f"this server does not answer to Host {host[:100]!r}"})
        origin = headers.get(b"origin")
        if origin is not None and scope.get("method", "GET") not in SAFE_METHODS:
            o = origin.decode("latin-1").strip().lower().rstrip("/")
            own = f"{scope.get('scheme', 'http')}://{host.strip().lower()}"
            if o != own and o not in self.allowed_origins:
                return await send_json(send, 403, {"error": "forbidden_origin",
                                                   "detail": f"cross-origin request from {o[:100]!r} refused; "
                                                             "allow it with --allow-origin"})
        return await self.app(scope, receive, send)


class SecurityHeaders:
    """CSP (no external resources, no inline script), no MIME sniffing, no framing; relative redirects."""

    HEADERS = [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
               (b"referrer-policy", b"no-referrer"), (b"x-frame-options", b"DENY")]

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(msg):
            if msg["type"] == "http.response.start":
                headers = [(k, _relative(v) if k.lower() == b"location" else v) for k, v in msg.get("headers") or []]
                msg = {**msg, "headers": headers + self.HEADERS}
            await send(msg)

        await self.app(scope, receive, with_headers)


def _relative(location: bytes) -> bytes:
    """``http://any-host/static/?q`` -> ``/static/?q``: a redirect never repeats a client-sent Host."""
    u = urlsplit(location.decode("latin-1"))
    path = "/" + u.path.lstrip("/")  # never "//evil.example": that would be protocol-relative
    return (path + (f"?{u.query}" if u.query else "")).encode("latin-1")


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a request-header timeout and a cap on open connections."""

    header_timeout: float = ServerLimits.header_timeout
    max_connections: int = ServerLimits.max_connections

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            self.transport.close()  # over the cap: closed before a byte is read
            return
        self._arm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_timer()  # the next request's headers get the same time

    def _arm_header_timer(self) -> None:
        self.loop.call_later(self.header_timeout, self._header_timeout, self.cycle)

    def _header_timeout(self, cycle_when_armed) -> None:
        # No new request cycle since the timer was armed: its headers never completed.
        if self.cycle is cycle_when_armed and not self.transport.is_closing():
            self.transport.close()


def server_config(app, host: str = "127.0.0.1", port: int = 0, limits: ServerLimits | None = None, **options):
    """A uvicorn Config for ``app`` with :class:`ServerLimits` applied (timeouts, connection cap, header size)."""
    limits = limits or ServerLimits()
    protocol = type("GuardedH11", (GuardedH11Protocol,), {"header_timeout": limits.header_timeout,
                                                          "max_connections": limits.max_connections})
    return uvicorn.Config(app, host=host, port=port, http=protocol, timeout_keep_alive=limits.keep_alive_timeout,
                          h11_max_incomplete_event_size=limits.max_header_bytes, lifespan="off", **options)


__all__ = ["CSP", "LOOPBACK_HOSTS", "NOTICE", "BodyLimit", "GuardedH11Protocol", "OriginPolicy", "SecurityHeaders",
           "ServerLimits", "send_json", "server_config", "with_notice"]
