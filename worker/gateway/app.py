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

from worker.gateway.errors import ApiError
from worker.gateway.gateway import Gateway
from worker.gateway.request_id import RequestIdMiddleware

logger = logging.getLogger(__name__)


def json_response(content: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(content), status_code=status_code, media_type="application/json", headers=headers)


def create_app(
    gateway: Gateway,
    *,
    lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]] | None = None,
    models_listing: Callable[[], dict[str, Any]],
    readiness: Callable[[], tuple[bool, dict[str, Any]]],
) -> FastAPI:
    app = FastAPI(title="worker", lifespan=lifespan, docs_url=None, redoc_url=None)
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
        logger.exception("unhandled error", extra={"request_id": request.scope.get("worker.request_id")})
        return ApiError(500, "internal error in the worker gateway").to_response()

    @app.post("/v1/chat/completions", include_in_schema=True)
    async def chat_completions(request: Request) -> Response:
        return await gateway.handle(request, "chat.completions")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await gateway.handle(request, "completions")

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        return await gateway.handle(request, "embeddings")

    @app.get("/v1/models")
    async def list_models() -> Response:
        return json_response(models_listing())

    @app.get("/health/live")
    async def live() -> Response:
        return json_response({"status": "alive"})

    @app.get("/health/ready")
    async def ready() -> Response:
        ok, detail = readiness()
        return json_response({"status": "ready" if ok else "not_ready", **detail}, status_code=200 if ok else 503,
                             headers=None if ok else {"retry-after": "5"})

    return app

