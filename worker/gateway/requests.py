"""Reading and checking client request bodies: just enough to route, meter and refuse bad input early.

Everything else in the body is the engine's to validate; it is forwarded untouched.
"""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request

from worker.gateway.errors import ApiError


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class _InferenceRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=128)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class ChatCompletionRequest(_InferenceRequest):
    messages: list[dict[str, Any]] = Field(min_length=1)


class CompletionRequest(_InferenceRequest):
    prompt: str | list[Any] = Field(min_length=1)


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    input: str | list[Any] = Field(min_length=1)


REQUEST_SCHEMAS: dict[str, type[BaseModel]] = {
    "chat.completions": ChatCompletionRequest,
    "completions": CompletionRequest,
    "embeddings": EmbeddingRequest,
}


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body is {declared} bytes; the limit is {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_body(endpoint: str, raw: bytes) -> tuple[dict[str, Any], BaseModel]:
    """Return the body as a dict (forwarded as is) and its checked head (model, stream, limits)."""
    if not raw:
        raise ApiError(400, "request body is empty; expected a JSON object")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise ApiError(400, f"request body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    try:
        head = REQUEST_SCHEMAS[endpoint].model_validate(body)
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise ApiError(400, f"invalid value for '{param}': {first['msg']}", param=param) from None
    return body, head
