"""Judging an uploaded file by its first bytes, before the rest of the request body is read.

A decompression bomb is small on the wire (a 3.5 MB PNG) but states its size in its first 33 bytes. Reading the
whole body before looking takes ~55 event-loop turns of 64 KB each; under load every turn waits behind other
requests' work, and the soak measured 233 ms (p99) to refuse one that way. Here the body's first messages are
buffered, the file's leading bytes are pulled out of them (its multipart part, or the start of its base64 string
in a JSON body) and given to the predictors' `screen_file` hooks. A refusal is answered at once and the
connection closed, so the rest is never read. Otherwise the buffered messages are replayed to the usual body
reader: what is parsed, and how, does not change.

Screening only happens when the body did not arrive in one piece: a body that is already complete costs nothing
more to read, and the predictor checks the header again before decoding anyway.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Awaitable, Callable, Sequence

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from ..errors import InputError

Message = dict
Receive = Callable[[], Awaitable[Message]]

# Past this much body without a verdict (e.g. a multipart form whose file comes after large other fields), stop
# screening: the normal path still checks the header before it decodes.
MAX_SCREENED_BODY = 256 * 1024


class Replay:
    """A `receive` that hands back the buffered messages first, then reads on."""

    def __init__(self, messages: list[Message], receive: Receive):
        self.messages, self.receive = messages, receive

    async def __call__(self) -> Message:
        if self.messages:
            return self.messages.pop(0)
        return await self.receive()


class MultipartPrefix:
    """The first bytes of one named part of a multipart body, fed chunk by chunk to python-multipart's streaming
    parser (the parser Starlette's form reader uses, so both agree on where the part starts)."""

    def __init__(self, boundary: bytes, field: str):
        self.field = field.encode()
        self.data = bytearray()
        self.complete = False  # the part ended within what was fed
        self.in_field = False
        header_name, header_value = bytearray(), bytearray()
        self.failed = False

        def on_header_field(data: bytes, start: int, end: int) -> None:
            header_name.extend(data[start:end])

        def on_header_value(data: bytes, start: int, end: int) -> None:
            header_value.extend(data[start:end])

        def on_header_end() -> None:
            if bytes(header_name).lower() == b"content-disposition":
                _, options = parse_options_header(bytes(header_value))
                self.in_field = options.get(b"name") == self.field and not self.data
            header_name.clear()
            header_value.clear()

        def on_part_data(data: bytes, start: int, end: int) -> None:
            if self.in_field:
                self.data.extend(data[start:end])

        def on_part_end() -> None:
            if self.in_field:
                self.complete, self.in_field = True, False

        self.parser = MultipartParser(boundary, {
            "on_header_field": on_header_field, "on_header_value": on_header_value, "on_header_end": on_header_end,
            "on_part_data": on_part_data, "on_part_end": on_part_end})

    def feed(self, chunk: bytes) -> None:
        if self.failed or self.complete:
            return
        try:
            self.parser.write(chunk)
        except Exception:  # a malformed form: not ours to judge here; Starlette's reader will say what is wrong
            self.failed = True

    def prefix(self) -> bytes:
        return bytes(self.data)


class JsonPrefix:
    """The decoded start of a JSON body's base64 string field (a browser's `data:` URL prefix allowed)."""

    def __init__(self, field: str):
        self.pattern = re.compile(rb'"' + re.escape(field.encode()) + rb'"\s*:\s*"(?:data:[^,"]{0,100},)?'
                                  rb"([A-Za-z0-9+/]*)")
        self.body = bytearray()

    def feed(self, chunk: bytes) -> None:
        self.body.extend(chunk)

    def prefix(self) -> bytes:
        match = self.pattern.search(self.body)
        if match is None:
            return b""
        text = match.group(1)
        try:
            return base64.b64decode(text[: len(text) // 4 * 4])
        except (binascii.Error, ValueError):
            return b""


async def screen_upload(request: Request, file_field: str, screens: Sequence[Callable[[bytes], bool]],
                        screen_bytes: int) -> Request:
    """`request` with the start of its body read and replayed, after `screens` saw the file's first bytes (at most
    `screen_bytes`). A screen raises InputError (InputTooLarge) to refuse; the request is refused when every
    screen refuses (one per served version: a version that takes the file keeps it). A screen returns False while
    it needs more bytes to decide."""
    receive = request.receive
    first = await receive()
    messages = [first]
    if first.get("type") != "http.request" or not first.get("more_body", False):
        return Request(request.scope, Replay(messages, receive))
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type == b"multipart/form-data" and options.get(b"boundary"):
        reader: MultipartPrefix | JsonPrefix = MultipartPrefix(options[b"boundary"], file_field)
    elif content_type in (b"application/json", b""):
        reader = JsonPrefix(file_field)
    else:
        return Request(request.scope, Replay(messages, receive))
    message, received = first, 0
    while True:
        chunk = message.get("body", b"")
        received += len(chunk)
        reader.feed(chunk)
        prefix = reader.prefix()[:screen_bytes]
        if prefix and judge(prefix, screens):
            break
        more = message.get("more_body", False)
        if not more or len(prefix) >= screen_bytes or received >= MAX_SCREENED_BODY + screen_bytes:
            break
        message = await receive()
        messages.append(message)
        if message.get("type") != "http.request":
            break
    return Request(request.scope, Replay(messages, receive))


def judge(prefix: bytes, screens: Sequence[Callable[[bytes], bool]]) -> bool:
    """True when every screen settled on the file (or refused it but another took it); raises the first refusal
    when all refuse; False while some screen needs more bytes."""
    refusals, settled = [], True
    for screen in screens:
        try:
            settled &= bool(screen(prefix))
        except InputError as exc:  # re-raised below when every screen refuses
            refusals.append(exc)
    if refusals and len(refusals) == len(screens):
        raise refusals[0]
    return settled
