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
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from worker.gateway.errors import ApiError
from worker.gateway.gateway import Gateway
from worker.gateway.request_id import SCOPE_KEY, RequestIdMiddleware, assign_request_id

logger = logging.getLogger(__name__)

INFERENCE_ROUTES = {
    "/v1/chat/completions": "chat.completions",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
}


def unexpected_error_response(request_id: str | None) -> Response:
    """Log the exception being handled and answer a plain 500 (its details stay in the log)."""
    logger.exception("unhandled error", extra={"request_id": request_id})
    return ApiError(500, "internal error in the worker gateway").to_response()


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
    """Answer one inference request straight from ASGI: the gateway's response, or its error's."""
    request_id = assign_request_id(scope)
    try:
        response = await gateway.handle(Request(scope, receive), endpoint)
    except ApiError as error:
        response = error.to_response()
    except Exception:  # noqa: BLE001  logged by unexpected_error_response
        response = unexpected_error_response(request_id)
    response.raw_headers.append((b"x-request-id", request_id.encode()))
    try:
        await response(scope, receive, send)
    except Exception:
        logger.exception("failed while sending the response", extra={"request_id": request_id})
        raise


def json_response(content: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(content), status_code=status_code, media_type="application/json", headers=headers)


def _inference_route(gateway: Gateway, endpoint: str) -> Callable[[Request], Any]:
    async def route(request: Request) -> Response:
        return await gateway.handle(request, endpoint)

    return route


def create_app(
    gateway: Gateway,
    *,
    lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]] | None = None,
    models_listing: Callable[[], dict[str, Any]],
    readiness: Callable[[], tuple[bool, dict[str, Any]]],
) -> WorkerApp:
    app = WorkerApp(gateway, title="worker", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(RequestIdMiddleware)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> Response:
        return error.to_response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> Response:
        return ApiError(error.status_code, str(error.detail)).to_response(dict(error.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, error: RequestValidationError) -> Response:
        first = error.errors()[0] if error.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in first["loc"] if p not in ("body", "query")) or None
        return ApiError(400, f"invalid value for '{param}': {first['msg']}", param=param).to_response()

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, error: Exception) -> Response:
        return unexpected_error_response(request.scope.get(SCOPE_KEY))

    for path, endpoint in INFERENCE_ROUTES.items():
        app.add_api_route(path, _inference_route(gateway, endpoint), methods=["POST"])

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

