"""uvicorn's HTTP/1.1 protocol (h11) with a deadline on the request head, so that a client that
sends half a request line or half its headers, or nothing at all, cannot hold a connection."""

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

# The request line and headers must arrive within this many seconds: of the connection being
# made, or on a kept-alive connection, of the first byte of the next request. A head is a few
# hundred bytes, so 10 s is generous for any real client on any real link.
HEADER_TIMEOUT_S = 10.0


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's keep-alive timer runs only between a response and the next byte, so a head that
    stops halfway would otherwise hold the connection forever. The deadline is not moved by
    further bytes (a client trickling a byte a second is still closed), and it ends as soon as
    the head is complete: the body has its own timeout (body_limit.py), and a response, streamed
    or not, has none.
    """

    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # h11 stays IDLE until it has parsed a whole head; any other state (a body, a response,
        # an error, an upgrade) is past the head.
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._arm_header_timer()
        else:
            self._cancel_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:  # already armed: the deadline stays where it was
            self._header_timer = self.loop.call_later(HEADER_TIMEOUT_S, self._header_timed_out)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        # No response: h11 can only answer a request it has parsed. Closing is what uvicorn
        # does when its keep-alive timer runs out, and what a client sees from an idle proxy.
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.conn.send(h11.ConnectionClosed())
            self.transport.close()
