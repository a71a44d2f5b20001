"""What one HTTP client may cost the server: a cap on the body's size, a deadline for the body
to arrive and one for the request headers (a slow client holds a connection, never the server).

    BodyLimits(app, max_bytes, timeout_s)   ASGI middleware: 413 over the cap (by Content-Length
                                            before reading, or by counting a chunked body),
                                            408 when the body stalls
    header_timeout_protocol(seconds)        uvicorn's h11 protocol, closing a connection whose
                                            request headers have not arrived in time
"""

from __future__ import annotations

import asyncio
import json

from starlette.exceptions import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol


class BodyTooLarge(HTTPException):  # HTTPExceptions pass through FastAPI's body parsing
    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"the body is over {max_bytes} bytes")


class BodyTimeout(HTTPException):
    def __init__(self, seconds: float) -> None:
        super().__init__(408, f"the body did not arrive within {seconds:g} s")


def _error_body(status: int, message: str) -> bytes:
    return json.dumps(
        {"error": {"message": message, "type": "invalid_request_error", "code": status}}
    ).encode()


class BodyLimits:
    """ASGI middleware bounding each request body (size and arrival time). Once the body is
    complete, `receive` is passed through unchanged (handlers wait on it for a disconnect)."""

    def __init__(self, app, max_bytes: int, timeout_s: float) -> None:
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await _respond(send, 413, f"the body is over {self.max_bytes} bytes")
        state = {"bytes": 0, "done": False}
        responded = []

        async def guarded_receive():
            if state["done"]:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.timeout_s)
            except asyncio.TimeoutError:
                raise BodyTimeout(self.timeout_s) from None
            if message["type"] == "http.request":
                state["bytes"] += len(message.get("body", b""))
                state["done"] = not message.get("more_body", False)
                if state["bytes"] > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message):
            responded.append(message)
            await send(message)

        try:
            await self.app(scope, guarded_receive, tracking_send)
        except (BodyTooLarge, BodyTimeout) as e:
            if responded:  # a response had started: nothing more can be said to this client
                return
            await _respond(send, e.status_code, e.detail)


async def _respond(send, status: int, message: str) -> None:
    body = _error_body(status, message)
    headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def header_timeout_protocol(seconds: float) -> type[H11Protocol]:
    """H11Protocol that closes a connection whose next request's headers are not complete
    within `seconds`: of connecting, or of the previous response on a kept-alive connection
    (uvicorn's keep-alive timer stops at the first byte, so a client trickling headers would
    otherwise hold the connection for ever)."""

    class HeaderTimeoutProtocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._header_timer = None
            self._arm()

        def _arm(self) -> None:
            self._waiting_after = self.cycle  # headers are in once a new cycle starts
            self._header_timer = self.loop.call_later(seconds, self._headers_late)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._header_timer is not None and self.cycle is not self._waiting_after:
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._disarm()
                self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _headers_late(self) -> None:
            self._header_timer = None
            if self.cycle is self._waiting_after and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutProtocol
