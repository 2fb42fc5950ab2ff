"""The address of the client a request came from, also when a relay process passed the request on."""

from __future__ import annotations

from starlette.types import Scope

# Set by a relay process on what it passes on to the worker process over their Unix socket, replacing
# any such header the client sent; read only for requests that came over that socket.
RELAYED_CLIENT_HEADER = b"x-worker-relayed-client"


def client_address(scope: Scope) -> str:
    """The TCP peer's address; for a request a relay passed on (it arrives over the worker's internal Unix
    socket, which has no peer address) the address the relay saw."""
    client = scope.get("client")
    if client:
        return str(client[0])
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    for name, value in headers:
        if name == RELAYED_CLIENT_HEADER:
            return value.decode("latin-1")
    return "unknown"


def with_relayed_client(scope: Scope, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """`headers` to pass on for the request of `scope`, naming its client (never what the client claimed)."""
    passed = [(name, value) for name, value in headers if name != RELAYED_CLIENT_HEADER]
    return [*passed, (RELAYED_CLIENT_HEADER, client_address(scope).encode("latin-1"))]
