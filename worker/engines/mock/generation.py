"""Turning engine sequences into vLLM-shaped chat/text completion responses, streaming or not."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.types import Send

from worker.engines.mock.engine import MockEngine
from worker.engines.mock.errors import generation_failed
from worker.engines.mock.faults import FaultMode
from worker.engines.mock.responses import json_start, sse_start
from worker.engines.mock.sequence import Sequence
from worker.engines.mock.wire import (
    DONE,
    ChunkWriter,
    chat_response,
    completion_response,
    error_event,
    prompt_tokens_details,
)


@dataclass(eq=False, slots=True)
class Choice:
    index: int
    sequence: Sequence
    prompt_tokens: int
    echo: str = ""  # completions with echo=true: the prompt text, sent before the first output
    completion_tokens: int = 0
    done: bool = False


@dataclass(eq=False)
class Generation:
    """One HTTP generation request: its choices (n per prompt) and how to answer it."""

    engine: MockEngine
    chat: bool
    response_id: str
    created: int
    prompt_tokens: int
    choices: list[Choice]
    notify: asyncio.Event
    prompt_heads: list[Sequence]  # each prompt's first sequence (n > 1 makes more per prompt)
    include_usage: bool = False
    continuous_usage: bool = False
    sequences: list[Sequence] = field(init=False)

    def __post_init__(self) -> None:
        self.sequences = [choice.sequence for choice in self.choices]

    def prompt_details(self) -> dict[str, Any] | None:
        """`usage.prompt_tokens_details` when the engine reports it: like vLLM, the counts of the last
        prompt's first sequence (a chat request has one prompt)."""
        if not self.engine.model.mock.enable_prompt_tokens_details:
            return None
        head = self.prompt_heads[-1]
        return prompt_tokens_details(head.cached_tokens or 0, head.created_cache_tokens, chat=self.chat)

    def abort(self) -> None:
        self.engine.abort(self.sequences)

    def gpu_seconds(self) -> float:
        return sum(sequence.gpu_seconds for sequence in self.sequences)

    async def stream(self, send: Send) -> bool:
        await sse_start(send)
        writer = ChunkWriter(chat=self.chat, response_id=self.response_id, created=self.created,
                             model=self.engine.model.id, fingerprint=self.engine.system_fingerprint,
                             include_usage=self.include_usage, continuous_usage=self.continuous_usage)
        faults = self.engine.faults
        role_sent = not self.chat
        sent_tokens = 0
        pending = list(self.choices)
        while pending:
            await self.notify.wait()
            self.notify.clear()
            outputs = []
            for choice in pending:
                text, tokens = choice.sequence.take_output()
                if tokens or choice.sequence.finished:
                    outputs.append((choice, text, tokens))
            if not outputs:
                continue
            new_tokens = sum(tokens for _, _, tokens in outputs)
            fault = faults.midstream_fault(sent_tokens)
            if fault is not None:
                return await self._fail_stream(send, fault)
            # A fault due within this output still lets the output through, but never its finish.
            fault = faults.midstream_fault(sent_tokens + new_tokens)
            parts: list[bytes] = []
            if not role_sent:
                # vLLM sends every choice's role chunk with the first output of the request.
                parts.extend(writer.role(choice.index, choice.prompt_tokens) for choice in self.choices)
                role_sent = True
            for choice, text, tokens in outputs:
                if choice.echo:
                    text, choice.echo = choice.echo + text, ""
                choice.completion_tokens += tokens
                sequence = choice.sequence
                if sequence.finished and fault is None:
                    parts.append(writer.final(choice.index, text, choice.prompt_tokens, choice.completion_tokens,
                                              sequence.finish_reason or "stop", sequence.stop_reason))
                    choice.done = True
                else:
                    parts.append(writer.text(choice.index, text, choice.prompt_tokens, choice.completion_tokens))
            sent_tokens += new_tokens
            await _body(send, b"".join(parts), more=True)
            if fault is not None:
                return await self._fail_stream(send, fault)
            pending = [choice for choice in pending if not choice.done]
        closing = (writer.usage(self.prompt_tokens, sent_tokens, self.prompt_details(), self.gpu_seconds()) + DONE
                   if self.include_usage else DONE)
        await _body(send, closing, more=False)
        return True

    @staticmethod
    async def _fail_stream(send: Send, fault: FaultMode) -> bool:
        if fault is FaultMode.abort_midstream:
            return False
        error = generation_failed()
        await _body(send, error_event(error.message, error.error_type, error.status) + DONE, more=False)
        return True

    async def respond(self, send: Send) -> bool:
        while not all(sequence.finished for sequence in self.sequences):
            await self.notify.wait()
            self.notify.clear()
        completion_tokens = sum(sequence.output_tokens for sequence in self.sequences)
        fault = self.engine.faults.midstream_fault(completion_tokens)
        if fault is FaultMode.error_midstream:
            error = generation_failed()
            body, status = orjson.dumps(error.body()), error.status
        else:
            results = []
            for choice in self.choices:
                text, _ = choice.sequence.take_output()
                results.append((choice.echo + text, choice.sequence.finish_reason or "stop",
                                choice.sequence.stop_reason))
            build = chat_response if self.chat else completion_response
            body = build(self.response_id, self.created, self.engine.model.id, self.engine.system_fingerprint,
                         results, self.prompt_tokens, completion_tokens, self.prompt_details(), self.gpu_seconds())
            status = 200
        await json_start(send, status, len(body))
        if fault is FaultMode.abort_midstream:
            await _body(send, body[: len(body) // 2], more=True)
            return False
        await _body(send, body, more=False)
        return True


def _body(send: Send, data: bytes, *, more: bool) -> Awaitable[None]:
    return send({"type": "http.response.body", "body": data, "more_body": more})
