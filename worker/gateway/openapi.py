"""The OpenAPI description of the inference routes: request bodies, success shapes and OpenAI errors.

The inference routes read their bodies themselves (see `worker.gateway.requests`), so FastAPI cannot
derive their documents from a signature. The request schemas are the gateway's own request models, as
they validate; `model` is narrowed to the models this node serves on that route, so a client (or a
fuzzer) sees which ids are accepted.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from worker.config import NodeConfig
from worker.gateway.requests import REQUEST_SCHEMAS


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error body, as every refusal of the gateway is shaped."""

    error: ErrorDetail


class _Open(BaseModel):
    # Engines add fields of their own (vLLM's `prompt_logprobs`, `usage.cost`, ...).
    model_config = ConfigDict(extra="allow")


class TokenUsage(_Open):
    prompt_tokens: int
    completion_tokens: int | None = None
    total_tokens: int


class ChatCompletion(_Open):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[dict[str, Any]]
    usage: TokenUsage | None = None


class Completion(_Open):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[dict[str, Any]]
    usage: TokenUsage | None = None


class EmbeddingList(_Open):
    object: Literal["list"]
    data: list[dict[str, Any]]
    model: str
    usage: TokenUsage | None = None


# OpenAI's own operation ids, so generated clients name the calls as OpenAI's do.
_OPERATIONS: dict[str, tuple[str, str]] = {
    "chat.completions": ("createChatCompletion", "Create a chat completion"),
    "completions": ("createCompletion", "Create a completion"),
    "embeddings": ("createEmbedding", "Create embeddings"),
}

_SUCCESS: dict[str, type[BaseModel]] = {
    "chat.completions": ChatCompletion,
    "completions": Completion,
    "embeddings": EmbeddingList,
}

# OpenAI's chat message, as far as the engine checks it (parts and tool calls are the engine's to read).
_CHAT_MESSAGE: dict[str, Any] = {
    "type": "object",
    "required": ["role"],
    "properties": {
        "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
        "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}, {"type": "null"}]},
        "name": {"type": "string"},
    },
    "additionalProperties": True,
}

# One event of a stream (OpenAPI before 3.2 describes an event stream by the schema of its events).
_STREAM_EVENT: dict[str, Any] = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "event": {"type": "string"},
        "data": {"type": "string",
                 "description": "A completion chunk as JSON (the last one may carry `usage`, or an error with "
                                "`finish_reason: \"error\"`), then `[DONE]`"},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
}

# Why each status is answered; the bodies are all `ErrorResponse`.
_ERRORS: dict[int, str] = {
    400: "Malformed JSON, an invalid field (`param` names it), a context too long, or a model that does not "
         "serve this route",
    401: "Missing, unknown, revoked or expired API key",
    402: "The account's balance or the key's monthly cap cannot cover the request's worst case",
    403: "The API key may not use this model",
    404: "No model with this id on this worker",
    413: "The body exceeds `worker.max_body_bytes`",
    429: "The key's rate limit, or the model's admission limit, is reached (see `Retry-After`)",
    502: "The engine failed before it answered",
    503: "The model is starting, draining or has no replica ready (see `Retry-After`)",
}


def _inline_refs(schema: Any, definitions: dict[str, Any], seen: tuple[str, ...] = ()) -> Any:
    """`schema` with every `#/$defs/...` reference replaced by its definition.

    pydantic's references point into the schema's own `$defs`, which mean nothing inside an OpenAPI
    document; the request models are not recursive, so they inline completely.
    """
    if isinstance(schema, list):
        return [_inline_refs(item, definitions, seen) for item in schema]
    if not isinstance(schema, dict):
        return schema
    reference = schema.get("$ref")
    if isinstance(reference, str) and reference.startswith("#/$defs/"):
        name = reference.removeprefix("#/$defs/")
        if name in seen:
            raise ValueError(f"request schema {name} is recursive and cannot be inlined")
        siblings = {key: value for key, value in schema.items() if key != "$ref"}
        return {**_inline_refs(definitions[name], definitions, (*seen, name)), **siblings}
    return {key: _inline_refs(value, definitions, seen) for key, value in schema.items() if key != "$defs"}


def request_body_schema(endpoint: str, config: NodeConfig) -> dict[str, Any]:
    """The JSON schema of `endpoint`'s request body, from its request model, for this node's models."""
    schema = REQUEST_SCHEMAS[endpoint].model_json_schema()
    inlined: dict[str, Any] = _inline_refs(schema, schema.get("$defs", {}))
    wants_embed = endpoint == "embeddings"
    served = [model.id for model in config.models if (model.task == "embed") == wants_embed]
    properties = inlined["properties"]
    if served:
        properties["model"] = {**properties["model"], "enum": served}
    messages = properties.get("messages")
    if messages is not None and "properties" not in messages.get("items", {}):
        # The gateway leaves messages to the engine, which needs each to have a role.
        properties["messages"] = {**messages, "items": _CHAT_MESSAGE}
    return inlined


def inference_route_docs(endpoint: str, config: NodeConfig) -> dict[str, Any]:
    """`add_api_route` arguments that document one inference route."""
    success: dict[str, Any] = {
        "description": "The engine's answer" + ("" if endpoint == "embeddings" else
                                                 "; a server-sent event stream when `stream` is true"),
        "model": _SUCCESS[endpoint],
    }
    if endpoint != "embeddings":
        success["content"] = {"text/event-stream": {"schema": _STREAM_EVENT}}
    responses: dict[int | str, dict[str, Any]] = {
        200: success,
        **{status: {"model": ErrorResponse, "description": why} for status, why in _ERRORS.items()},
    }
    body = {"required": True, "content": {"application/json": {"schema": request_body_schema(endpoint, config)}}}
    operation_id, summary = _OPERATIONS[endpoint]
    return {"operation_id": operation_id, "summary": summary, "responses": responses,
            "openapi_extra": {"requestBody": body}}
