"""Response bodies byte-compatible with vLLM 0.32's OpenAI server.

Streaming chunks are assembled from pre-serialised byte pieces so a chunk costs one orjson call for its
text; vLLM omits unset fields in chunks (`exclude_unset`) and dumps every field in full responses.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

DONE = b"data: [DONE]\n\n"

# `usage.gpu_seconds`, the request's share of the engine's busy time, is the mock's extension: vLLM does not
# send it. The worker reads it and takes it out of the usage its clients get.


def usage_dict(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens}


def prompt_tokens_details(cached_tokens: int, created_cache_tokens: int, *, chat: bool) -> dict[str, Any]:
    """vLLM's `usage.prompt_tokens_details` with --enable-prompt-tokens-details (completions leave the cache
    creation count unset)."""
    return {"cached_tokens": cached_tokens, "created_cache_tokens": created_cache_tokens if chat else None,
            "multimodal_tokens": None}


def _continuous_usage(prompt_tokens: int, completion_tokens: int, with_details: bool) -> bytes:
    usage = usage_dict(prompt_tokens, completion_tokens)
    if with_details:
        usage["completion_tokens_details"] = None
    return orjson.dumps(usage)


def error_event(message: str, error_type: str, status: int) -> bytes:
    """vLLM's in-stream error event (it uses json.dumps, hence the spaces)."""
    body = json.dumps({"error": {"message": message, "type": error_type, "param": None, "code": status}})
    return b"data: " + body.encode() + b"\n\n"


class ChunkWriter:
    """SSE chunks of one streaming chat or text completion."""

    def __init__(self, *, chat: bool, response_id: str, created: int, model: str, fingerprint: str,
                 include_usage: bool, continuous_usage: bool) -> None:
        self._chat = chat
        self._continuous_usage = continuous_usage
        # vLLM stamps its fingerprint on the last chunk only: the usage chunk, or else each finish chunk.
        stamp = b',"system_fingerprint":' + orjson.dumps(fingerprint)
        self._usage_stamp = stamp
        self._finish_stamp = b"" if include_usage else stamp
        object_type = "chat.completion.chunk" if chat else "text_completion"
        header = orjson.dumps({"id": response_id, "object": object_type, "created": created, "model": model})
        self._head = b"data: " + header[:-1] + b',"choices":['
        self._usage_head = b"data: " + header[:-1] + b',"choices":[],"usage":'
        if chat:
            self._text_key = b',"delta":{"content":'
            self._tail = b'},"logprobs":null,"finish_reason":null,"token_ids":null}]'
        else:
            self._text_key = b',"text":'
            self._tail = (b',"logprobs":null,"finish_reason":null,"stop_reason":null,"prompt_token_ids":null,'
                          b'"token_ids":null}]')

    def role(self, index: int, prompt_tokens: int) -> bytes:
        """The first chat chunk of a choice: the assistant role and empty content."""
        usage = b""
        if self._continuous_usage:
            usage = b',"usage":' + _continuous_usage(prompt_tokens, 0, True)
        return (self._head + b'{"index":' + str(index).encode()
                + b',"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]'
                + usage + b',"prompt_token_ids":null,"prompt_text":null}\n\n')

    def text(self, index: int, text: str, prompt_tokens: int, completion_tokens: int) -> bytes:
        usage = b""
        if self._continuous_usage:
            usage = b',"usage":' + _continuous_usage(prompt_tokens, completion_tokens, self._chat)
        return (self._head + b'{"index":' + str(index).encode() + self._text_key + orjson.dumps(text)
                + self._tail + usage + b"}\n\n")

    def final(self, index: int, text: str, prompt_tokens: int, completion_tokens: int, finish_reason: str,
              stop_reason: str | None) -> bytes:
        """A choice's last chunk: its remaining text together with the finish reason."""
        usage = b""
        if self._continuous_usage:
            usage = b',"usage":' + _continuous_usage(prompt_tokens, completion_tokens, self._chat)
        reasons = (b',"finish_reason":' + orjson.dumps(finish_reason)
                   + b',"stop_reason":' + orjson.dumps(stop_reason))
        if self._chat:
            choice = (b'{"index":' + str(index).encode() + self._text_key + orjson.dumps(text)
                      + b'},"logprobs":null' + reasons + b',"token_ids":null}]')
        else:
            choice = (b'{"index":' + str(index).encode() + self._text_key + orjson.dumps(text)
                      + b',"logprobs":null' + reasons + b',"prompt_token_ids":null,"token_ids":null}]')
        return self._head + choice + usage + self._finish_stamp + b"}\n\n"

    def usage(self, prompt_tokens: int, completion_tokens: int, details: dict[str, Any] | None = None,
              gpu_seconds: float | None = None) -> bytes:
        """The closing `include_usage` chunk: no choices, usage of all choices together."""
        usage = usage_dict(prompt_tokens, completion_tokens)
        if details is not None:
            # Streamed usage leaves out unset fields: completions set only cached_tokens.
            usage["prompt_tokens_details"] = details if self._chat else {"cached_tokens": details["cached_tokens"]}
        if gpu_seconds is not None:
            usage["gpu_seconds"] = gpu_seconds
        return self._usage_head + orjson.dumps(usage) + self._usage_stamp + b"}\n\n"


def _full_usage(prompt_tokens: int, completion_tokens: int, details: dict[str, Any] | None,
                gpu_seconds: float | None) -> dict[str, Any]:
    usage = {**usage_dict(prompt_tokens, completion_tokens), "prompt_tokens_details": details,
             "completion_tokens_details": None}
    if gpu_seconds is not None:
        usage["gpu_seconds"] = gpu_seconds
    return usage


def chat_response(response_id: str, created: int, model: str, fingerprint: str,
                  choices: list[tuple[str, str, str | None]], prompt_tokens: int, completion_tokens: int,
                  details: dict[str, Any] | None = None, gpu_seconds: float | None = None) -> bytes:
    """`choices`: (text, finish_reason, stop_reason) per choice index."""
    return orjson.dumps({
        "id": response_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [
            {"index": index,
             "message": {"role": "assistant", "content": text, "refusal": None, "annotations": None,
                         "audio": None, "function_call": None, "reasoning": None},
             "logprobs": None, "finish_reason": finish_reason, "stop_reason": stop_reason, "token_ids": None,
             "routed_experts": None}
            for index, (text, finish_reason, stop_reason) in enumerate(choices)
        ],
        "service_tier": None, "system_fingerprint": fingerprint,
        "usage": _full_usage(prompt_tokens, completion_tokens, details, gpu_seconds), "prompt_logprobs": None,
        "prompt_token_ids": None, "prompt_text": None, "kv_transfer_params": None,
        "ec_transfer_params": None, "metrics": None,
    })


def completion_response(response_id: str, created: int, model: str, fingerprint: str,
                        choices: list[tuple[str, str, str | None]], prompt_tokens: int,
                        completion_tokens: int, details: dict[str, Any] | None = None,
                        gpu_seconds: float | None = None) -> bytes:
    return orjson.dumps({
        "id": response_id, "object": "text_completion", "created": created, "model": model,
        "choices": [
            {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason,
             "stop_reason": stop_reason, "token_ids": None, "prompt_logprobs": None, "prompt_token_ids": None,
             "routed_experts": None}
            for index, (text, finish_reason, stop_reason) in enumerate(choices)
        ],
        "service_tier": None, "system_fingerprint": fingerprint,
        "usage": _full_usage(prompt_tokens, completion_tokens, details, gpu_seconds), "kv_transfer_params": None,
        "ec_transfer_params": None, "metrics": None,
    })


def embedding_response(response_id: str, created: int, model: str, embeddings: list[list[float] | str],
                       prompt_tokens: int, gpu_seconds: float | None = None) -> bytes:
    return orjson.dumps({
        "id": response_id, "object": "list", "created": created, "model": model,
        "data": [{"index": index, "object": "embedding", "embedding": embedding}
                 for index, embedding in enumerate(embeddings)],
        "usage": _full_usage(prompt_tokens, 0, None, gpu_seconds),
    })


def models_response(model_id: str, root: str, created: int, max_model_len: int, permission_id: str) -> bytes:
    return orjson.dumps({
        "object": "list",
        "data": [{
            "id": model_id, "object": "model", "created": created, "owned_by": "vllm", "root": root,
            "parent": None, "max_model_len": max_model_len,
            "permission": [{
                "id": permission_id, "object": "model_permission", "created": created,
                "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
                "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
                "organization": "*", "group": None, "is_blocking": False,
            }],
        }],
    })
