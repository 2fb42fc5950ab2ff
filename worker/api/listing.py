"""`GET /openrouter/models`: the node's models in OpenRouter's nested provider schema (v2.4)."""

from __future__ import annotations

import orjson
from fastapi import APIRouter
from starlette.responses import Response

from worker.registry.listing import ModelCatalog

OPENROUTER_V24_PATH = "/openrouter/models"


def build_listing_router(catalog: ModelCatalog) -> APIRouter:
    router = APIRouter()

    @router.get(OPENROUTER_V24_PATH)
    async def openrouter_models() -> Response:
        return Response(orjson.dumps(catalog.listing_v24()), media_type="application/json")

    return router
