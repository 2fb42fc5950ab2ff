"""Reading and checking client request bodies before anything is held for them.

Every field that changes what a request costs or how much work the engine does is validated with the
type OpenAI's API gives it (strictly: `"20"` and `20.0` are not an `n`), and the body forwarded to the
engine is the validated one, so the engine never does more than was reserved. Fields that change neither
are the engine's to validate and are forwarded untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import ClientDisconnect, Request

from worker.gateway.errors import ApiError

if TYPE_CHECKING:
    from worker.config import ModelConfig
from worker.gateway.request_id import SCOPE_KEY

# Deeper JSON is refused before any hold: orjson writes back at most 254 levels, and no OpenAI request
# needs more than a dozen (tool schemas nest deepest).
MAX_JSON_DEPTH = 64
# vLLM's default `max_logprobs`; OpenAI allows 20 top log probabilities (5 for legacy completions).
MAX_LOGPROBS = 20
MAX_SEQUENCES = 128
# OpenAI's limit on the inputs of one embeddings request.
MAX_EMBEDDING_INPUTS = 2048

Count = Annotated[int, Field(ge=1, le=MAX_SEQUENCES)]
TokenBudget = Annotated[int, Field(ge=1)]
TokenId = Annotated[int, Field(ge=0)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    model: str = Field(min_length=1)


class _GenerationRequest(_Request):
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Count = 1
    max_tokens: TokenBudget | None = None
    max_completion_tokens: TokenBudget | None = None
    # vLLM's extensions that add engine work.
    min_tokens: Annotated[int, Field(ge=0)] | None = None
    prompt_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None

    def inconsistency(self) -> tuple[str, str] | None:
        """(param, message) for fields that are valid alone but not together."""
        budget = self.max_completion_tokens or self.max_tokens
        if self.min_tokens is not None and budget is not None and self.min_tokens > budget:
            return "min_tokens", f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({budget})"
        return None


class ChatCompletionRequest(_GenerationRequest):
    messages: list[dict[str, Any]] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None


class CompletionRequest(_GenerationRequest):
    prompt: str | list[str] | list[TokenId] | list[Annotated[list[TokenId], Field(min_length=1)]] = Field(
        min_length=1
    )
    best_of: Count | None = None
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool | None = None
    suffix: str | None = None

    def inconsistency(self) -> tuple[str, str] | None:
        if self.best_of is not None and self.best_of < self.n:
            return "best_of", f"best_of ({self.best_of}) must be at least n ({self.n})"
        return super().inconsistency()


class EmbeddingRequest(_Request):
    input: (
        str
        | Annotated[list[str], Field(max_length=MAX_EMBEDDING_INPUTS)]
        | list[TokenId]
        | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(max_length=MAX_EMBEDDING_INPUTS)]
    ) = Field(min_length=1)
    dimensions: Annotated[int, Field(ge=1)] | None = None
    encoding_format: Literal["float", "base64"] | None = None


InferenceRequest = ChatCompletionRequest | CompletionRequest | EmbeddingRequest

REQUEST_SCHEMAS: dict[str, type[ChatCompletionRequest | CompletionRequest | EmbeddingRequest]] = {
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
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        # The client's doing, and it is gone: one line at info, no traceback.
        logging.getLogger(__name__).info("request body ended before its declared length", extra={
            "request_id": request.scope.get(SCOPE_KEY), "received_bytes": size,
            "declared_bytes": declared})
        raise ApiError(400, "the request body ended before its declared length (the client went away)",
                       code="incomplete_body") from None
    return b"".join(chunks)


def json_depth_exceeds(value: Any, limit: int) -> bool:
    """Whether `value` nests containers deeper than `limit` (iterative: a deep body cannot exhaust the stack)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def parse_body(endpoint: str, raw: bytes) -> tuple[dict[str, Any], InferenceRequest]:
    """The validated body as it goes to the engine, and the validated request it came from."""
    if not raw:
        raise ApiError(400, "request body is empty; expected a JSON object")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise ApiError(400, f"request body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    if json_depth_exceeds(body, MAX_JSON_DEPTH):
        raise ApiError(400, f"request body nests JSON deeper than {MAX_JSON_DEPTH} levels")
    try:
        head = REQUEST_SCHEMAS[endpoint].model_validate(body)
    except ValidationError as error:
        first = error.errors()[0]
        loc = first["loc"]
        param = str(loc[0]) if loc else None
        where = f"'{param}'" if param else "the request"
        raise ApiError(400, f"invalid value for {where}: {first['msg']}", param=param) from None
    inconsistency = head.inconsistency() if isinstance(head, _GenerationRequest) else None
    if inconsistency is not None:
        param, message = inconsistency
        raise ApiError(400, message, param=param)
    # Extra fields come back as they were; declared ones as validated (strict, so never coerced).
    return head.model_dump(exclude_unset=True), head


def session_key(model: ModelConfig, headers: Mapping[str, str], body: dict[str, Any]) -> str | None:
    """The client's session: its session header (`routing.session_header`), else the OpenAI `user` field."""
    value = headers.get(model.routing.session_header) or body.get("user")
    return value[:256] if isinstance(value, str) and value else None
