"""Request bodies the mock engine accepts, and vLLM 0.32's rules for them.

Unknown fields are accepted and ignored, as vLLM does (temperature, top_p, tools, ...).
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from worker.engines.mock.errors import EngineError, validation_error

_RequestT = TypeVar("_RequestT", bound=BaseModel)

PromptInput = str | list[str] | list[int] | list[list[int]]


class OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class SamplingRequest(OpenAIRequest):
    max_tokens: int | None = None
    n: int = Field(default=1, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    include_stop_str_in_output: bool = False
    stream: bool | None = False
    stream_options: StreamOptions | None = None

    def requested_max_tokens(self) -> tuple[int | None, str]:
        return self.max_tokens, "max_tokens"

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        return tuple(s for s in stops if s)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True

    def requested_max_tokens(self) -> tuple[int | None, str]:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    def message_dicts(self) -> list[dict[str, Any]]:
        return [message.model_dump() for message in self.messages]


class CompletionRequest(SamplingRequest):
    prompt: PromptInput
    max_tokens: int | None = 16  # OpenAI's and vLLM's default for completions
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None


class EmbeddingRequest(OpenAIRequest):
    input: PromptInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None


class TokenizeRequest(OpenAIRequest):
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = True
    return_token_strs: bool | None = False


def parse_body(raw: bytes, model: type[_RequestT]) -> _RequestT:
    """Parses a request body, failing the way vLLM does (400, every validation error listed)."""
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise validation_error([{"type": "json_invalid", "loc": ("body", exc.pos), "msg": "JSON decode error",
                                 "input": {}}]) from None
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        errors = [{**error, "loc": ("body", *error["loc"])} for error in exc.errors(include_url=False)]
        raise validation_error(errors) from None


def check_sampling(request: SamplingRequest) -> None:
    """Rules vLLM applies to every generation request before it looks at the prompt."""
    if request.stream_options is not None and not request.stream:
        raise EngineError("Stream options can only be defined when `stream=True`.", param="stream_options")
    if isinstance(request, ChatRequest) and (request.logprobs or request.top_logprobs):
        raise EngineError("logprobs are not supported by this engine.", param="logprobs")
    if isinstance(request, CompletionRequest):
        if request.logprobs is not None:
            raise EngineError("logprobs are not supported by this engine.", param="logprobs")
        if request.suffix is not None:
            raise EngineError("suffix is only supported for models with FIM completion rendering",
                              param="suffix")
    requested, _ = request.requested_max_tokens()
    if requested is not None and requested < 1:
        raise EngineError(f"max_tokens must be at least 1, got {requested}.", param="max_tokens")


def output_budget(request: SamplingRequest, prompt_tokens: int, max_model_len: int, *, from_text: bool) -> int:
    """How many tokens this prompt may generate, or the 400 vLLM 0.32 answers.

    vLLM 0.32 refuses a `max_tokens` above the context length and a prompt that leaves no room for one
    output token; otherwise it quietly caps `max_tokens` at what the context has left.
    """
    requested, param = request.requested_max_tokens()
    if requested is not None and requested > max_model_len:
        raise _validation(f"{param}={requested} cannot be greater than max_model_len={max_model_len}. "
                          f"Please request fewer output tokens.", param, requested)
    check_prompt_length(prompt_tokens, max_model_len, from_text=from_text)
    if prompt_tokens == max_model_len:
        raise EngineError(
            f"The decoder prompt (length {prompt_tokens}) plus the number of requested output tokens (at least 1) "
            f"is longer than the maximum model length of {max_model_len}. Make sure that `max_model_len` is no "
            f"smaller than the number of text tokens (prompt + requested output tokens).")
    room = max_model_len - prompt_tokens
    return room if requested is None else min(room, requested)


def check_prompt_length(prompt_tokens: int, max_model_len: int, *, from_text: bool) -> None:
    if prompt_tokens == 0:
        raise EngineError("The decoder prompt cannot be empty")
    if prompt_tokens > max_model_len:
        # vLLM tokenizes text with truncation at max_model_len + 1, so it only knows "at least" that many.
        count = min(prompt_tokens, max_model_len + 1) if from_text else prompt_tokens
        qualifier = "at least " if count == max_model_len + 1 else ""
        raise _validation(
            f"This model's maximum context length is {max_model_len} tokens. However, your prompt contains "
            f"{qualifier}{count} input tokens, which exceeds this limit even without any output tokens. "
            f"Please reduce the length of the input prompt.", "input_tokens", count)


def _validation(message: str, param: str, value: object) -> EngineError:
    # vLLM's validation errors end with the parameter and the rejected value.
    return EngineError(f"{message} (parameter={param}, value={value})", param=param)


def split_prompts(prompt: PromptInput) -> list[str | list[int]]:
    """A completions/embeddings `prompt`/`input` as a list of single prompts (text or token ids)."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        return [[]]
    if all(isinstance(item, int) for item in prompt):
        return [list(prompt)]  # type: ignore[arg-type]
    return list(prompt)  # type: ignore[arg-type]
