"""uvicorn's HTTP protocol with limits on the request head: its size and the time it may take to arrive.

uvicorn's httptools protocol (the fast one, which `uvicorn[standard]` brings) buffers a request line and headers
of any size and waits for them forever: a 100 MB `X-Caller-Id` was accepted (+380 MB, the event loop stalled for
4.5 s), and a client trickling header bytes holds its connection open indefinitely. The app's middleware cannot
help: it runs only once the whole head has arrived. So the limits live here, counted as bytes arrive:

- more than `max_header_bytes` received while the head is incomplete: 431, and the connection is closed;
- the head not complete within `header_timeout_s` of the connection's opening, or of the first byte of a later
  request on a kept-alive connection (uvicorn's keep-alive timeout covers the wait for that byte): 408, closed.

The error body has the shape the request's path uses (serve/error_formats.py: OpenAI's on /v1/completions), read
from the part of the URL parsed so far.

Where httptools is absent uvicorn falls back to h11, whose own `h11_max_incomplete_event_size` is set instead
(run_server); h11 has no head timeout.
"""

from __future__ import annotations

import json
import logging

from .error_formats import ErrorFormats
from .logs import log

REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


def error_bytes(status: int, code: str, message: str, path: str = "", formats: ErrorFormats | None = None) -> bytes:
    """A complete HTTP/1.1 error response in the error shape of the API at `path`, closing the connection."""
    body = json.dumps((formats or ErrorFormats()).body(path, status, code, message)).encode()
    return b"".join([b"HTTP/1.1 %d %s\r\n" % (status, REASONS[status]), b"content-type: application/json\r\n",
                     b"content-length: %d\r\n" % len(body), b"connection: close\r\n\r\n", body])


def httptools_protocol(max_header_bytes: int, header_timeout_s: float, formats: ErrorFormats | None = None):
    """A subclass of uvicorn's httptools protocol enforcing the two limits; None when httptools is not installed."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return None

    class LimitedHttpToolsProtocol(HttpToolsProtocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.head_bytes = 0
            self.in_head = True
            self.head_timer = self.loop.call_later(header_timeout_s, self.head_timed_out)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self.in_head, self.head_bytes = True, 0
            if self.head_timer is None:
                self.head_timer = self.loop.call_later(header_timeout_s, self.head_timed_out)

        def on_headers_complete(self) -> None:
            self.in_head = False
            if self.head_timer is not None:
                self.head_timer.cancel()
                self.head_timer = None
            super().on_headers_complete()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.in_head and not self.transport.is_closing():
                # Counted after parsing: a chunk that completes the head is not counted, one that starts a new
                # message is (on_message_begin reset the count during the parse).
                self.head_bytes += len(data)
                if self.head_bytes > max_header_bytes:
                    self.refuse(431, "headers_too_large", f"headers: larger than the limit of {max_header_bytes} "
                                "bytes (request line and headers together); send smaller headers (the server's "
                                "--max-header-bytes)")

        def connection_lost(self, exc) -> None:
            if self.head_timer is not None:
                self.head_timer.cancel()
                self.head_timer = None
            super().connection_lost(exc)

        def head_timed_out(self) -> None:
            self.head_timer = None
            if self.in_head and not self.transport.is_closing():
                self.refuse(408, "header_timeout", f"headers: not received within {header_timeout_s} s; send the "
                            "request head promptly")

        def refuse(self, status: int, code: str, message: str) -> None:
            log("request refused", logging.INFO, status=status, error=code, client=str(self.client))
            path = getattr(self, "url", b"").decode("latin-1")  # as much of the URL as has arrived
            self.transport.write(error_bytes(status, code, message, path, formats))
            self.transport.close()

    return LimitedHttpToolsProtocol
