"""One error type for everything the gateway refuses, its OpenAI-shaped body, and the one mapping from the
domain's refusals (worker/refusals.py) to status codes, error codes and headers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from starlette.responses import Response

from worker import refusals

# OpenAI `type` per HTTP status, as routers expect them.
_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "insufficient_quota",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    502: "provider_unavailable",
    503: "service_unavailable",
    504: "timeout_error",
}

# String codes for the statuses vLLM reports with a bare integer code.
_CODE_BY_STATUS = {
    400: "invalid_request",
    401: "invalid_api_key",
    402: "insufficient_quota",
    403: "permission_denied",
    404: "not_found",
    408: "timeout",
    413: "payload_too_large",
    422: "unprocessable_entity",
    429: "rate_limit_exceeded",
    500: "internal_error",
    502: "provider_unavailable",
    503: "provider_overloaded",
    504: "timeout",
}


class ApiError(Exception):
    """A request the gateway answers with an OpenAI error body instead of engine output."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        error_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code if code is not None else _CODE_BY_STATUS.get(status)
        self.param = param
        self.error_type = error_type or _TYPE_BY_STATUS.get(status, "api_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}
        }

    def to_response(self, extra_headers: dict[str, str] | None = None) -> Response:
        headers = {**self.headers, **(extra_headers or {})}
        return Response(orjson.dumps(self.body()), status_code=self.status, media_type="application/json",
                        headers=headers)


# Status and OpenAI `code` of each refusal (the most specific class listed first wins); None: the status's own.
_REFUSAL_ANSWERS: tuple[tuple[type[refusals.Refusal], int, str | None], ...] = (
    (refusals.InvalidKey, 401, "invalid_api_key"),
    (refusals.ModelNotAllowed, 403, "model_not_allowed"),
    (refusals.InsufficientBalance, 402, "insufficient_quota"),
    (refusals.SpendCapReached, 402, "spend_cap_reached"),
    (refusals.RateLimited, 429, "rate_limit_exceeded"),
    (refusals.AtCapacity, 429, "rate_limit_exceeded"),
    (refusals.ContextTooLong, 400, "context_length_exceeded"),
    (refusals.BillingUnavailable, 503, "billing_unavailable"),
    (refusals.WorkerIdTakenOver, 503, "worker_id_taken_over"),
    (refusals.Unavailable, 503, None),
)


def api_error(refusal: refusals.Refusal, headers: Mapping[str, str] | None = None) -> ApiError:
    """The answer to `refusal`, with `headers` (what the hooks set so far) under the refusal's own."""
    status, code = next(((status, code) for kind, status, code in _REFUSAL_ANSWERS if isinstance(refusal, kind)),
                        (400, None))
    own = {"retry-after": str(refusal.retry_after_s)} if refusal.retry_after_s is not None else {}
    return ApiError(status, refusal.message, code=code, param=getattr(refusal, "param", None),
                    headers={**(headers or {}), **own})


def normalise_engine_error(status: int, payload: bytes) -> bytes:
    """Rewrite an engine's error body to OpenAI's shape with a string `code`.

    vLLM puts the integer HTTP status in `code` and sometimes answers with a bare `{"detail": ...}`
    (FastAPI) or `{"object": "error", ...}` (older servers).
    """
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        data = None
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):
        if isinstance(data, dict) and "message" in data:
            error = data
        else:
            detail = data.get("detail") if isinstance(data, dict) else None
            message = detail if isinstance(detail, str) else payload.decode("utf-8", "replace")[:2000]
            error = {"message": message or f"engine answered HTTP {status}"}
    message = str(error.get("message") or f"engine answered HTTP {status}")
    code = error.get("code")
    if not isinstance(code, str) or code.isdigit():
        code = _classify_code(status, message)
    param = error.get("param")
    error_type = error.get("type")
    if not isinstance(error_type, str) or error_type in {"BadRequestError", "NotFoundError", "InternalServerError"}:
        error_type = _TYPE_BY_STATUS.get(status, "api_error")
    return orjson.dumps(
        {"error": {"message": message, "type": error_type, "param": param if isinstance(param, str) else None,
                   "code": code}}
    )


def _classify_code(status: int, message: str) -> str | None:
    lowered = message.lower()
    if status == 400 and ("context length" in lowered or "maximum context" in lowered
                          or "max_model_len" in lowered or "too long" in lowered):
        return "context_length_exceeded"
    if status == 404 and "model" in lowered:
        return "model_not_found"
    return _CODE_BY_STATUS.get(status)

