"""The mock engine's HTTP app: vLLM 0.32's OpenAI server surface plus /mock/fault and /mock/accounting
for tests."""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import AsyncIterator

import orjson
from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response

from worker.config import ModelConfig
from worker.engines.mock import endpoints
from worker.engines.mock.engine import VLLM_VERSION, MockEngine
from worker.engines.mock.errors import EngineError
from worker.engines.mock.faults import FaultMode, FaultSpec
from worker.engines.mock.protocol import parse_body
from worker.engines.mock.wire import models_response

logger = logging.getLogger(__name__)


def build_mock_app(model: ModelConfig, *, kv_events_host: str | None = None) -> FastAPI:
    """An app that answers like `vllm serve` for `model`, with simulated continuous batching; KV-cache
    events are published on `kv_events_host` when the model's mock config sets `kv_events_port`."""
    engine = MockEngine(model, kv_events_host=kv_events_host)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.ensure_running()
        try:
            yield
        finally:
            await engine.aclose()

    app = FastAPI(title="mock engine", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.permission_id = f"modelperm-{uuid.uuid4().int & (2**64 - 1):016x}"
    app.add_exception_handler(EngineError, _engine_error_response)  # type: ignore[arg-type]

    app.add_route("/health", health, methods=["GET"])
    app.add_route("/metrics", metrics, methods=["GET"])
    app.add_route("/metrics/", filtered_metrics, methods=["GET"])
    app.add_route("/v1/models", list_models, methods=["GET"])
    app.add_route("/version", version, methods=["GET"])
    app.add_route("/load", load, methods=["GET"])
    app.add_route("/tokenize", endpoints.tokenize, methods=["POST"])
    app.add_route("/mock/fault", get_fault, methods=["GET"])
    app.add_route("/mock/fault", set_fault, methods=["POST"])
    app.add_route("/mock/accounting", accounting, methods=["GET"])
    # Like vLLM, only the endpoints of the model's task exist; the others answer 404.
    if model.task == "embed":
        app.add_route("/v1/embeddings", endpoints.embeddings, methods=["POST"])
    else:
        app.add_route("/v1/chat/completions", endpoints.chat_completions, methods=["POST"])
        app.add_route("/v1/completions", endpoints.completions, methods=["POST"])
    return app


async def _engine_error_response(_: Request, exc: EngineError) -> Response:
    return exc.response()


async def health(request: Request) -> Response:
    # Like vLLM: 200 unless the engine is known dead, even while it makes no progress.
    return Response(status_code=503 if endpoints.engine_of(request).dead else 200)


async def metrics(request: Request) -> Response:
    return Response(endpoints.engine_of(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def filtered_metrics(request: Request) -> Response:
    # vLLM's /metrics/ is prometheus_client's exporter: `name[]` selects samples, none selects all.
    names = request.query_params.getlist("name[]")
    return Response(endpoints.engine_of(request).metrics.render(names or None), media_type=CONTENT_TYPE_LATEST)


async def list_models(request: Request) -> Response:
    engine = endpoints.engine_of(request)
    body = models_response(engine.model.id, engine.model.source, engine.created, engine.limits.max_model_len,
                           request.app.state.permission_id)
    return Response(body, media_type="application/json")


async def version(_: Request) -> Response:
    return Response(orjson.dumps({"version": VLLM_VERSION}), media_type="application/json")


async def load(request: Request) -> Response:
    return Response(orjson.dumps({"server_load": endpoints.engine_of(request).server_load}),
                    media_type="application/json")


async def get_fault(request: Request) -> Response:
    return Response(endpoints.engine_of(request).faults.spec.model_dump_json(), media_type="application/json")


async def set_fault(request: Request) -> Response:
    engine = endpoints.engine_of(request)
    spec = parse_body(await request.body(), FaultSpec)
    logger.warning("mock engine fault set", extra={"fault_mode": spec.mode.value, "model": engine.model.id})
    if spec.mode is FaultMode.crash:
        # Answer first so the caller knows the fault took, then die without any cleanup.
        return Response(spec.model_dump_json(), media_type="application/json",
                        background=BackgroundTask(os._exit, spec.exit_code))
    engine.faults.apply(spec)
    return Response(spec.model_dump_json(), media_type="application/json")


async def accounting(request: Request) -> Response:
    """The engine's busy seconds and each finished request's share of them (`usage.gpu_seconds`)."""
    return Response(orjson.dumps(endpoints.engine_of(request).accounting.snapshot()), media_type="application/json")
