"""What other packages (billing, capacity, metrics) plug into the request path."""

from __future__ import annotations

from typing import Any, Protocol

from worker.gateway.context import RequestContext, RequestView


class RequestHooks(Protocol):
    """Called by the gateway for every inference request, in the order of `pipeline.request_hooks`.

    - `before_request`: before routing; raise a `worker.refusals.Refusal` to refuse. Must be cheap.
    - `after_route`: once the serving replica is known, before the response starts (provenance headers).
    - `usage_extras`: once, when the engine's usage is known; returns fields merged into the client's
      `usage` object (e.g. `cost`). Synchronous and cheap: it runs on the hot path.
    - `finalize`: exactly once per request that passed `before_request`. For an answer the engine
      produced it is awaited before the last byte reaches the client (so a completed response is always
      recorded); for a refusal or after a disconnect/failure it runs just after, without holding the
      answer back (`Gateway.aclose()` waits for those). Must not raise.
    """

    async def before_request(self, ctx: RequestContext, request: RequestView) -> None: ...

    def after_route(self, ctx: RequestContext) -> None: ...

    def usage_extras(self, ctx: RequestContext) -> dict[str, Any]: ...

    async def finalize(self, ctx: RequestContext) -> None: ...


class ObservingHook:
    """Base for hooks that only watch requests end (metrics, logs): every other step is a no-op."""

    async def before_request(self, ctx: RequestContext, request: RequestView) -> None:
        return None

    def after_route(self, ctx: RequestContext) -> None:
        return None

    def usage_extras(self, ctx: RequestContext) -> dict[str, Any]:
        return {}

    async def finalize(self, ctx: RequestContext) -> None:
        return None
