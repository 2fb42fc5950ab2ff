"""The OpenAI endpoints: chat/text completions, embeddings and /tokenize."""

from __future__ import annotations

import array
import asyncio
import base64
import time
import uuid
from collections.abc import Callable

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Send

from worker.engines.mock import tokens
from worker.engines.mock.engine import MockEngine
from worker.engines.mock.errors import EngineError
from worker.engines.mock.generation import Choice, Generation
from worker.engines.mock.protocol import (
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    SamplingRequest,
    TokenizeRequest,
    check_prompt_length,
    check_sampling,
    output_budget,
    parse_body,
    split_prompts,
)
from worker.engines.mock.responses import Producer, WatchedResponse, json_start
from worker.engines.mock.sequence import Sequence
from worker.engines.mock.wire import embedding_response


def engine_of(request: Request) -> MockEngine:
    engine: MockEngine = request.app.state.engine
    return engine


def _base_request_id(request: Request) -> str:
    # vLLM names the response after the caller's X-Request-Id when there is one.
    return request.headers.get("x-request-id") or f"{uuid.uuid4().int & (2**64 - 1):016x}"


async def chat_completions(request: Request) -> Response:
    engine = engine_of(request)
    body = parse_body(await request.body(), ChatRequest)
    check_sampling(body)
    engine.check_model(body.model)
    engine.check_accepting()
    prompt_ids = tokens.encode_chat(body.message_dicts(), body.add_generation_prompt)
    max_tokens = output_budget(body, len(prompt_ids), engine.limits.max_model_len, from_text=True)
    return _start_generation(engine, body, f"chatcmpl-{_base_request_id(request)}", chat=True,
                             prompts=[(prompt_ids, max_tokens, "")])


async def completions(request: Request) -> Response:
    engine = engine_of(request)
    body = parse_body(await request.body(), CompletionRequest)
    check_sampling(body)
    engine.check_model(body.model)
    engine.check_accepting()
    prompts = []
    for prompt in split_prompts(body.prompt):
        if isinstance(prompt, str):
            prompt_ids, echo = tokens.encode(prompt), prompt
        else:
            if body.echo:
                raise EngineError("echo is only supported for text prompts by this engine.", param="echo")
            prompt_ids, echo = prompt, ""
        max_tokens = output_budget(body, len(prompt_ids), engine.limits.max_model_len,
                                   from_text=isinstance(prompt, str))
        prompts.append((prompt_ids, max_tokens, echo if body.echo else ""))
    return _start_generation(engine, body, f"cmpl-{_base_request_id(request)}", chat=False, prompts=prompts)


def _start_generation(engine: MockEngine, body: SamplingRequest, response_id: str, *, chat: bool,
                      prompts: list[tuple[list[int], int, str]]) -> Response:
    notify = asyncio.Event()
    choices: list[Choice] = []
    prompt_heads = []
    for prompt_ids, max_tokens, echo in prompts:
        sequences = engine.submit(response_id, prompt_ids, max_tokens, body.n, body.seed, body.stop_strings(),
                                  body.include_stop_str_in_output, notify)
        prompt_heads.append(sequences[0])
        choices.extend(Choice(len(choices), sequence, len(prompt_ids), echo) for sequence in sequences)
    options = body.stream_options
    generation = Generation(
        engine=engine, chat=chat, response_id=response_id, created=int(time.time()),
        prompt_tokens=sum(len(prompt_ids) for prompt_ids, _, _ in prompts), choices=choices, notify=notify,
        prompt_heads=prompt_heads,
        include_usage=bool(options and options.include_usage),
        continuous_usage=bool(options and options.include_usage and options.continuous_usage_stats),
    )
    produce = generation.stream if body.stream else generation.respond
    return _tracked(engine, response_id, generation.sequences, produce, generation.abort)


def _tracked(engine: MockEngine, response_id: str, sequences: list[Sequence], produce: Producer,
             abort: Callable[[], None]) -> WatchedResponse:
    """A response counted in /load while it runs; `abort` drops whatever it left unfinished. Its
    sequences' GPU time is kept for `/mock/accounting` when it ends."""
    engine.server_load += 1

    def close() -> None:
        engine.server_load -= 1
        abort()
        engine.accounting.record(response_id, sum(sequence.gpu_seconds for sequence in sequences))

    return WatchedResponse(produce, close)


async def embeddings(request: Request) -> Response:
    engine = engine_of(request)
    body = parse_body(await request.body(), EmbeddingRequest)
    engine.check_model(body.model)
    engine.check_accepting()
    dim = engine.model.mock.embedding_dim
    if body.dimensions is not None and body.dimensions != dim:
        raise EngineError(f'Model "{engine.model.id}" does not support matryoshka representation, changing '
                          f"output dimensions will lead to poor results.", param="dimensions")
    inputs = split_prompts(body.input)
    prompts = [tokens.encode(p) if isinstance(p, str) else p for p in inputs]
    for given, prompt_ids in zip(inputs, prompts, strict=True):
        check_prompt_length(len(prompt_ids), engine.limits.max_model_len, from_text=isinstance(given, str))
    response_id = f"embd-{_base_request_id(request)}"
    notify = asyncio.Event()
    sequences = [seq for prompt_ids in prompts
                 for seq in engine.submit(response_id, prompt_ids, 0, 1, None, (), False, notify)]

    async def produce(send: Send) -> bool:
        while not all(sequence.finished for sequence in sequences):
            await notify.wait()
            notify.clear()
        vectors: list[list[float] | str] = []
        for prompt_ids in prompts:
            vector = tokens.embedding_vector(engine.model.mock.seed, prompt_ids, dim)
            vectors.append(base64.b64encode(array.array("f", vector).tobytes()).decode()
                           if body.encoding_format == "base64" else vector)
        payload = embedding_response(response_id, int(time.time()), engine.model.id, vectors,
                                     sum(len(p) for p in prompts), sum(s.gpu_seconds for s in sequences))
        await json_start(send, 200, len(payload))
        await send({"type": "http.response.body", "body": payload, "more_body": False})
        return True

    return _tracked(engine, response_id, sequences, produce, lambda: engine.abort(sequences))


async def tokenize(request: Request) -> Response:
    engine = engine_of(request)
    body = parse_body(await request.body(), TokenizeRequest)
    engine.check_model(body.model)
    if body.messages is not None:
        pieces = tokens.chat_token_strings([m.model_dump() for m in body.messages], body.add_generation_prompt)
    elif body.prompt is not None:
        pieces = tokens.split_words(body.prompt)
    else:
        raise EngineError("Either `prompt` or `messages` must be given.", param="prompt")
    payload = {"count": len(pieces), "max_model_len": engine.limits.max_model_len,
               "tokens": [tokens.token_id(piece) for piece in pieces],
               "token_strs": pieces if body.return_token_strs else None}
    return Response(orjson.dumps(payload), media_type="application/json")
