"""The FastAPI application: OpenAI-compatible routes, health, and error mapping."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import orjson
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from worker.gateway.errors import ApiError
from worker.gateway.gateway import Gateway
from worker.gateway.openapi import inference_route_docs
from worker.gateway.request_id import SCOPE_KEY, RequestIdMiddleware, assign_request_id

logger = logging.getLogger(__name__)

INFERENCE_ROUTES = {
    "/v1/chat/completions": "chat.completions",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
}


def unexpected_error_response(request_id: str | None, error: Exception) -> Response:
    """Log `error` with its traceback and answer a plain 500 (its details stay in the log)."""
    logger.error("unhandled error", exc_info=error, extra={"request_id": request_id})
    return ApiError(500, "internal error in the worker gateway").to_response()


class AnswerUnexpectedErrors:
    """Answer an exception no route handled with a plain 500 and log it once, with its traceback.

    Starlette's own handler for `Exception` re-raises after answering, so the server logged every such
    error a second time; this one does not. Inference requests never pass here (the gateway answers them).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_noting_start(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_noting_start)
        except Exception as error:  # noqa: BLE001  logged by unexpected_error_response
            response = unexpected_error_response(scope.get(SCOPE_KEY), error)
            if not started:  # else the client sees its response cut short
                await response(scope, receive, send)


class WorkerApp(FastAPI):
    """FastAPI, except that inference requests go straight from ASGI to the gateway.

    They carry every token, so they skip routing and the middleware stack (each layer wraps every body
    message sent); the gateway answers their errors and request ids itself. The same endpoints stay
    registered as routes too, for the schema and for mounts under a root path.
    """

    def __init__(self, gateway: Gateway, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = inference_endpoint(scope)
        if endpoint is not None:
            await serve_inference(self.gateway, endpoint, scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def inference_endpoint(scope: Scope) -> str | None:
    """The inference endpoint an HTTP request is for ("chat.completions", ...), None for every other."""
    if scope["type"] == "http" and scope["method"] == "POST":
        return INFERENCE_ROUTES.get(scope["path"])
    return None


async def serve_inference(gateway: Gateway, endpoint: str, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer one inference request straight from ASGI (the gateway answers its errors too)."""
    assign_request_id(scope)
    await gateway.serve(endpoint, scope, receive, send)


class _GatewayAnswer(Response):
    """What the registered inference routes return: the gateway answers the request when this is sent."""

    def __init__(self, gateway: Gateway, endpoint: str) -> None:
        super().__init__()
        self.gateway = gateway
        self.endpoint = endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.gateway.serve(self.endpoint, scope, receive, send)


def json_response(content: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(content), status_code=status_code, media_type="application/json", headers=headers)


def _inference_route(gateway: Gateway, endpoint: str) -> Callable[[Request], Any]:
    async def route(request: Request) -> Response:
        return _GatewayAnswer(gateway, endpoint)

    return route


def create_app(
    gateway: Gateway,
    *,
    lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]] | None = None,
    models_listing: Callable[[], dict[str, Any]],
    readiness: Callable[[], tuple[bool, dict[str, Any]]],
) -> WorkerApp:
    app = WorkerApp(gateway, title="worker", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(AnswerUnexpectedErrors)  # inside RequestIdMiddleware: its 500s carry the request id
    app.add_middleware(RequestIdMiddleware)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> Response:
        return error.to_response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Response:
        if isinstance(error.__cause__, ClientDisconnect):  # FastAPI's 400 for a body cut short: the client left
            logger.info("request body ended before its declared length",
                        extra={"request_id": request.scope.get(SCOPE_KEY), "path": request.url.path})
        return ApiError(error.status_code, str(error.detail)).to_response(dict(error.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, error: RequestValidationError) -> Response:
        first = error.errors()[0] if error.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in first["loc"] if p not in ("body", "query", "path")) or None
        return ApiError(400, f"invalid value for '{param}': {first['msg']}", param=param).to_response()

    for path, endpoint in INFERENCE_ROUTES.items():
        app.add_api_route(path, _inference_route(gateway, endpoint), methods=["POST"],
                          **inference_route_docs(endpoint, gateway.config))

    @app.get("/v1/models")
    async def list_models() -> Response:
        return json_response(models_listing())

    @app.get("/health/live")
    async def live() -> Response:
        return json_response({"status": "alive"})

    # `/health` as vLLM answers it (200 while it can serve, 503 otherwise): GuideLLM's backend check, vLLM's
    # Kubernetes recipes and production-stack probe that path.
    @app.get("/health")
    @app.get("/health/ready")
    async def ready() -> Response:
        ok, detail = readiness()
        return json_response({"status": "ready" if ok else "not_ready", **detail}, status_code=200 if ok else 503,
                             headers=None if ok else {"retry-after": "5"})

    return app

