"""The inference request path: check, route, relay, meter."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import httpx
import orjson
from starlette.requests import Request
from starlette.responses import Response

from worker.config import NodeConfig
from worker.engines.replica import Replica
from worker.gateway.context import RequestContext, Usage
from worker.gateway.errors import ApiError, normalise_engine_error
from worker.gateway.hooks import RequestHooks
from worker.gateway.relay import Finalizer, RelayStreamResponse, open_upstream, race_disconnect
from worker.gateway.requests import parse_body, read_body
from worker.gateway.routing import ReplicaRouter

ENDPOINT_PATHS = {
    "chat.completions": "/v1/chat/completions",
    "completions": "/v1/completions",
    "embeddings": "/v1/embeddings",
}


class ReplicaSource(Protocol):
    by_model: Mapping[str, Sequence[Replica]]


class Gateway:
    def __init__(self, config: NodeConfig, replicas: ReplicaSource, hooks: Sequence[RequestHooks]) -> None:
        self.config = config
        self.replicas = replicas
        self.hooks = list(hooks)
        self.router = ReplicaRouter()

    async def handle(self, request: Request, endpoint: str) -> Response:
        raw = await read_body(request, self.config.worker.max_body_bytes)
        body, head = parse_body(endpoint, raw)
        model = self.config.model(getattr(head, "model"))
        if model is None:
            raise ApiError(404, f"The model '{getattr(head, 'model')}' does not exist on this worker",
                           code="model_not_found", param="model")
        if (endpoint == "embeddings") != (model.task == "embed"):
            kind = "an embedding" if model.task == "embed" else "a generation"
            raise ApiError(400, f"model '{model.id}' is {kind} model and does not serve /{endpoint.replace('.', '/')}",
                           code="unsupported_endpoint", param="model")
        stream = bool(getattr(head, "stream", False))
        options = getattr(head, "stream_options", None)
        ctx = RequestContext(
            request_id=request.scope["worker.request_id"], endpoint=endpoint, model=model, body=body,
            stream=stream, client_wants_usage=stream and bool(options and options.include_usage),
            headers={},
        )
        finalizer = Finalizer(ctx, [])
        try:
            for passed, hook in enumerate(self.hooks, start=1):
                await hook.before_request(ctx, request)
                finalizer.hooks = self.hooks[:passed]  # only hooks that admitted the request finalize it
            return await self._serve(request, ctx, finalizer)
        except ApiError as error:
            if not finalizer.done:
                ctx.outcome = "rejected"
                ctx.status_code = error.status
                ctx.error_message = error.message
                await finalizer()
            error.headers = {**ctx.response_headers, **error.headers}
            raise

    async def _serve(self, request: Request, ctx: RequestContext, finalizer: Finalizer) -> Response:
        replicas = self.replicas.by_model.get(ctx.model.id, ())
        replica = self.router.choose(replicas)
        if replica is None:
            raise ApiError(503, f"no replica of model '{ctx.model.id}' is ready; retry shortly",
                           headers={"retry-after": "5"})
        if ctx.stream:
            ctx.body["stream_options"] = {**(ctx.body.get("stream_options") or {}), "include_usage": True}
        payload = orjson.dumps(ctx.body)
        try:
            upstream = await self._open(replica, ctx, payload)
        except ApiError as error:
            # The replica died between health checks: shed to a sibling before any byte was sent.
            retry = self.router.choose(replicas, exclude=replica) if error.status == 503 else None
            if retry is None:
                raise
            replica = retry
            upstream = await self._open(replica, ctx, payload)
        ctx.replica = replica
        replica.in_flight += 1
        headers = {"x-worker-replica": replica.replica_id, **ctx.response_headers}

        def release() -> None:
            replica.in_flight -= 1

        handed_off = False
        try:
            if upstream.status_code != 200:
                return await self._engine_error(upstream, ctx, finalizer, headers)
            if ctx.stream:
                handed_off = True  # the streaming response releases the replica when it ends
                return RelayStreamResponse(upstream, ctx, finalizer, headers, on_done=release)
            return await self._complete(request, upstream, ctx, finalizer, headers)
        finally:
            if not handed_off:
                release()

    async def _engine_error(self, upstream: Any, ctx: RequestContext, finalizer: Finalizer,
                            headers: dict[str, str]) -> Response:
        payload = await upstream.aread()
        await upstream.aclose()
        ctx.first_byte_monotonic = time.monotonic()
        ctx.status_code = upstream.status_code
        ctx.outcome = "invalid_request" if upstream.status_code < 500 else "engine_error"
        await finalizer()
        return Response(normalise_engine_error(upstream.status_code, payload),
                        status_code=upstream.status_code, media_type="application/json", headers=headers)

    async def _open(self, replica: Replica, ctx: RequestContext, payload: bytes) -> httpx.Response:
        return await open_upstream(replica, ENDPOINT_PATHS[ctx.endpoint], payload, ctx)

    async def _complete(self, request: Request, upstream: Any, ctx: RequestContext, finalizer: Finalizer,
                        headers: dict[str, str]) -> Response:
        disconnected, payload = await race_disconnect(request.receive, upstream.aread())
        await upstream.aclose()
        ctx.first_byte_monotonic = time.monotonic()
        if disconnected:
            ctx.outcome = "client_disconnected"
            await finalizer()
            return Response(status_code=499)
        ctx.status_code = 200
        try:
            data = orjson.loads(payload)
        except orjson.JSONDecodeError:
            data = None
        if isinstance(data, dict):
            ctx.usage = Usage.from_openai(data.get("usage"))
            reasons = [c.get("finish_reason") for c in data.get("choices") or () if isinstance(c, dict)]
            ctx.finish_reason = "error" if "error" in reasons else next((r for r in reasons if r), None)
            extras = finalizer.usage_extras()
            if extras and isinstance(data.get("usage"), dict):
                data["usage"].update(extras)
                payload = orjson.dumps(data)
        await finalizer()
        return Response(payload, status_code=200, media_type="application/json", headers=headers)
