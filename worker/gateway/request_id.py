"""Give every request an id (the client's `x-request-id` when it sent a sane one) and echo it back."""

from __future__ import annotations

import re

import uuid_utils
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_ACCEPTABLE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
SCOPE_KEY = "worker.request_id"


def assign_request_id(scope: Scope) -> str:
    """The request's id, kept in its scope: the client's own when acceptable, else a new one."""
    request_id = ""
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            candidate = value.decode("latin-1")
            request_id = candidate if _ACCEPTABLE_ID.match(candidate) else ""
            break
    request_id = request_id or f"req-{uuid_utils.uuid7().hex}"
    scope[SCOPE_KEY] = request_id
    return request_id


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = (b"x-request-id", assign_request_id(scope).encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0] != b"x-request-id"]
                message["headers"] = [*headers, header]
            await send(message)

        await self.app(scope, receive, send_with_id)
