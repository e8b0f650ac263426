"""The connection level of `lmforge serve`: uvicorn's settings, and a deadline for request headers.

A client that opens connections and sends nothing, or its headers a byte at a time, would hold them
forever: uvicorn times out an idle keep-alive connection between requests but has no deadline for the
headers of a request (nor for a fresh connection's first byte). HeaderDeadlineProtocol adds one
(serve.header_timeout), closes a connection beyond serve.max_connections at once, and leaves the rest to
uvicorn's h11 protocol. The body's deadline (serve.body_timeout, 408) is the app's GuardMiddleware, which
reads the body; all of these act before the API key is checked.

The protocol also offers each request's app a way to drop its connection at once (RESET_EXTENSION in the
scope's "extensions"): a stream whose reader stalled (app.GuardedStream) cannot end politely, because
closing a transport waits for its unsent bytes, which that reader never takes.

    uvicorn.Server(uvicorn_config(app, config, host, port)).run()
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any, Optional

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from lmforge.serve.config import ServeConfig

MAX_HEADER_BYTES = 16 * 1024  # h11's cap on a request line plus headers (uvicorn's default); larger -> 400
# A fixed kernel send buffer per connection. Linux grows it up to tcp_wmem's max (4 MB) otherwise, and a client
# that stops reading is only noticed (serve.stall_timeout) once it is full: minutes of a slow model's output.
SEND_BUFFER_BYTES = 64 * 1024
RESET_EXTENSION = "lmforge.reset"  # scope["extensions"][RESET_EXTENSION]: a callable that resets the connection


class HeaderDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's headers and a cap on open connections."""

    header_timeout = 10.0   # set by `protocol_for`
    max_connections = 256

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: Optional[asyncio.TimerHandle] = None
        if len(self.connections) > self.max_connections:
            transport.abort()  # connection_lost follows and takes it out of self.connections
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._offer_reset()
        if self.conn.their_state is not h11.IDLE:  # the request's headers are complete
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start a pipelined next request
        self._offer_reset()
        if not self.transport.is_closing():
            self._arm()  # the next request's headers: the keep-alive timeout covers the idle part

    def _offer_reset(self) -> None:
        """Put `reset` into the scope of the request just parsed (its app task is created, not yet run)."""
        cycle = getattr(self, "cycle", None)
        if cycle is not None:
            cycle.scope.setdefault("extensions", {})[RESET_EXTENSION] = self.reset

    def reset(self) -> None:
        """Drop the connection now: the kernel discards what is unsent and the client gets a reset (SO_LINGER 0),
        instead of a close that waits for a reader who stopped reading."""
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _disarm(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.abort()  # nothing to answer: it never finished asking


def protocol_for(config: ServeConfig) -> type:
    """HeaderDeadlineProtocol with the deadline and the cap of `config`."""
    return type("HeaderDeadlineProtocol", (HeaderDeadlineProtocol,),
                {"header_timeout": config.header_timeout, "max_connections": config.max_connections})


def uvicorn_config(app: Any, config: ServeConfig, host: str = "127.0.0.1", port: int = 8000,
                   log_level: str = "info", **kwargs: Any) -> uvicorn.Config:
    """uvicorn's settings for serving `app` under `config`: the h11 protocol with the header deadline,
    timeout_keep_alive, limit_concurrency (requests beyond max_connections -> 503) and the header size cap."""
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http=protocol_for(config),
                          timeout_keep_alive=config.keep_alive_timeout, limit_concurrency=config.max_connections + 1,
                          h11_max_incomplete_event_size=MAX_HEADER_BYTES, **kwargs)
