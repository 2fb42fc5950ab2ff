"""One structured log line per inference request, written when it ends."""

from __future__ import annotations

import logging
import time

from worker.gateway.context import RequestContext
from worker.gateway.hooks import ObservingHook

logger = logging.getLogger("worker.access")


class AccessLog(ObservingHook):
    async def finalize(self, ctx: RequestContext) -> None:
        end = ctx.finished_monotonic or time.monotonic()
        ttft = ctx.first_byte_monotonic - ctx.started_monotonic if ctx.first_byte_monotonic else None
        admit = ctx.admitted_monotonic - ctx.started_monotonic if ctx.admitted_monotonic else None
        logger.info("request", extra={
            "request_id": ctx.request_id,
            "record_id": ctx.record_id,
            "model": ctx.model.id,
            "endpoint": ctx.endpoint,
            "replica": ctx.replica.replica_id if ctx.replica else None,
            "status": ctx.status_code,
            "outcome": ctx.outcome,
            "stream": ctx.stream,
            "finish_reason": ctx.finish_reason,
            "prompt_tokens": ctx.usage.prompt_tokens if ctx.usage else None,
            "completion_tokens": ctx.usage.completion_tokens if ctx.usage else None,
            "admit_ms": round(admit * 1000, 2) if admit is not None else None,
            "ttft_ms": round(ttft * 1000, 2) if ttft is not None else None,
            "duration_ms": round((end - ctx.started_monotonic) * 1000, 2),
            "error": ctx.error_message,
            **({"gateway_process": ctx.gateway_process} if ctx.gateway_process is not None else {}),
        })
