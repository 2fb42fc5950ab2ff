"""`GET /capacity` and the maintenance switches `POST /admin/drain` / `POST /admin/undrain`."""

from __future__ import annotations

import logging

import orjson
from fastapi import APIRouter, Depends
from pydantic import SecretStr
from starlette.requests import Request
from starlette.responses import Response

from worker.api.admin_auth import AdminAccess
from worker.capacity.monitor import CapacityMonitor
from worker.gateway.errors import ApiError
from worker.metrics.access import require_metrics_token

logger = logging.getLogger(__name__)


def _json(content: object) -> Response:
    return Response(orjson.dumps(content), media_type="application/json")


def build_capacity_router(capacity: CapacityMonitor, admin_access: AdminAccess | SecretStr | None,
                          metrics_token: SecretStr | None = None) -> APIRouter:
    router = APIRouter()

    @router.get("/capacity", dependencies=[Depends(require_metrics_token(metrics_token))])
    async def capacity_document() -> Response:
        return Response(capacity.document().model_dump_json(), media_type="application/json")

    access = admin_access if isinstance(admin_access, AdminAccess) else AdminAccess(admin_access)
    admin = APIRouter(prefix="/admin", dependencies=[Depends(access)])

    @admin.post("/drain")
    async def drain(request: Request) -> Response:
        capacity.drain.begin()
        await access.record(request, "worker.drain", None,
                            {"draining": True, "in_flight": capacity.in_flight})
        return _json({"draining": True, "in_flight": capacity.in_flight})

    @admin.post("/undrain")
    async def undrain(request: Request) -> Response:
        if not capacity.drain.end():
            raise ApiError(409, "the worker is shutting down and cannot take work again", code="shutting_down")
        await access.record(request, "worker.undrain", None,
                            {"draining": False, "in_flight": capacity.in_flight})
        return _json({"draining": False, "in_flight": capacity.in_flight})

    router.include_router(admin)
    return router
