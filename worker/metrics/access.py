"""Who may read the node's monitoring pages (`/metrics`, `/metrics/node`, `/capacity`).

They tell anyone who can reach the node's public URL how loaded it is and what it serves, so an operator
can require `WORKER_METRICS_TOKEN`. Health endpoints stay open: load balancers and kubelets probe them
without credentials.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from pydantic import SecretStr
from starlette.requests import Request

from worker.gateway.errors import ApiError


def require_metrics_token(metrics_token: SecretStr | None) -> Callable[[Request], Awaitable[None]]:
    """A FastAPI dependency: `Authorization: Bearer <metrics token>` when one is set, nothing otherwise."""
    expected = metrics_token.get_secret_value().encode() if metrics_token is not None else None

    async def check_metrics_token(request: Request) -> None:
        if expected is None:
            return
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        # compare_digest: the time taken says nothing about how much of the token was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(presented.strip().encode(), expected):
            raise ApiError(401, "missing or wrong metrics token (WORKER_METRICS_TOKEN)",
                           code="invalid_metrics_token", headers={"www-authenticate": "Bearer"})

    return check_metrics_token
