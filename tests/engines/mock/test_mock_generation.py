"""Chat and text completions as vLLM 0.32 answers them: shapes, determinism, usage, stop, n, streaming."""

from __future__ import annotations

import array
import base64

import httpx
import orjson

from tests.engines.mock.mock_engine_support import asgi_client, chat_body, make_model, sse_events, sse_json


async def tokenize_count(client: httpx.AsyncClient, text: str) -> int:
    response = await client.post("/tokenize", json={"prompt": text})
    assert response.status_code == 200
    return int(response.json()["count"])


async def test_chat_completion_has_vllm_shape() -> None:
    async with asgi_client(make_model()) as (client, _):
        response = await client.post("/v1/chat/completions", json=chat_body(max_tokens=7),
                                     headers={"x-request-id": "abc123"})
        assert response.status_code == 200
        body = response.json()
        assert body["id"] == "chatcmpl-abc123"
        assert body["object"] == "chat.completion"
        assert body["model"] == "mock-model"
        (choice,) = body["choices"]
        assert choice["index"] == 0
        assert choice["message"]["role"] == "assistant"
        assert choice["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 7
        assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 7
        assert await tokenize_count(client, choice["message"]["content"]) == 7


async def test_same_seed_and_prompt_give_same_text_and_other_seeds_do_not() -> None:
    async def text(client: httpx.AsyncClient, **extra: object) -> str:
        response = await client.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 20,
                                                             **extra})
        return str(response.json()["choices"][0]["text"])

    async with asgi_client(make_model(seed=7)) as (client, _):
        first, again = await text(client), await text(client)
        with_request_seed = await text(client, seed=1234)
        assert await text(client, seed=1234) == with_request_seed
    async with asgi_client(make_model(seed=7)) as (client, _):
        other_process = await text(client)
    async with asgi_client(make_model(seed=8)) as (client, _):
        other_engine_seed = await text(client)

    assert first == again == other_process
    assert len({first, with_request_seed, other_engine_seed}) == 3


async def test_streamed_chat_follows_vllm_framing_and_usage_matches_streamed_tokens() -> None:
    async with asgi_client(make_model()) as (client, _):
        response = await client.post("/v1/chat/completions", json=chat_body(
            max_tokens=25, stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True}))
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks = sse_json(response.text)

        first, *content, final_usage = chunks
        assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert all(chunk["id"] == first["id"] and chunk["id"].startswith("chatcmpl-") for chunk in chunks)
        assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
        assert content[-1]["choices"][0]["finish_reason"] == "length"
        assert all(chunk["choices"][0]["finish_reason"] is None for chunk in content[:-1])
        streamed = "".join(chunk["choices"][0]["delta"]["content"] for chunk in content)

        assert final_usage["choices"] == []
        usage = final_usage["usage"]
        assert usage["completion_tokens"] == 25
        assert await tokenize_count(client, streamed) == usage["completion_tokens"]
        # Continuous usage on every chunk counts up to the same total.
        assert content[-1]["usage"]["completion_tokens"] == usage["completion_tokens"]
        counts = [chunk["usage"]["completion_tokens"] for chunk in content]
        assert counts == sorted(counts)


async def test_usage_chunk_only_when_asked_for() -> None:
    async with asgi_client(make_model()) as (client, _):
        plain = sse_json((await client.post("/v1/chat/completions",
                                            json=chat_body(max_tokens=5, stream=True))).text)
        with_usage = sse_json((await client.post("/v1/chat/completions", json=chat_body(
            max_tokens=5, stream=True, stream_options={"include_usage": True}))).text)

    assert all(chunk["choices"] for chunk in plain)
    assert all("usage" not in chunk for chunk in plain)  # vLLM leaves the field out entirely
    assert with_usage[-1]["choices"] == [] and with_usage[-1]["usage"]["completion_tokens"] == 5
    assert all("usage" not in chunk for chunk in with_usage[:-1])


async def test_chat_without_max_tokens_fills_the_context() -> None:
    async with asgi_client(make_model(engine_args={"max_model_len": 64})) as (client, _):
        body = (await client.post("/v1/chat/completions", json=chat_body())).json()
    assert body["usage"]["total_tokens"] == 64
    assert body["choices"][0]["finish_reason"] == "length"


async def test_max_tokens_larger_than_the_room_left_is_capped_like_vllm_0_32() -> None:
    async with asgi_client(make_model(engine_args={"max_model_len": 64})) as (client, _):
        body = (await client.post("/v1/chat/completions", json=chat_body(max_completion_tokens=60))).json()
    assert body["usage"]["total_tokens"] == 64


async def test_completions_default_to_16_tokens_and_count_prompt_tokens() -> None:
    async with asgi_client(make_model()) as (client, _):
        body = (await client.post("/v1/completions", json={"prompt": "one two three, four."})).json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["usage"].pop("gpu_seconds") >= 0.0
    assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 16, "total_tokens": 22,
                             "prompt_tokens_details": None, "completion_tokens_details": None}


async def test_stop_string_ends_generation_and_is_not_returned() -> None:
    async with asgi_client(make_model()) as (client, _):
        request = {"prompt": "The river", "max_tokens": 30}
        full = (await client.post("/v1/completions", json=request)).json()["choices"][0]["text"]
        words = full.split(" ")
        stop = " " + words[4]  # the fourth generated word, with its leading space
        expected = full[: full.index(stop)]

        stopped = (await client.post("/v1/completions", json={**request, "stop": ["zzz", stop]})).json()
        streamed = sse_json((await client.post("/v1/completions",
                                               json={**request, "stop": stop, "stream": True})).text)
        included = (await client.post("/v1/completions", json={**request, "stop": stop,
                                                              "include_stop_str_in_output": True})).json()

    choice = stopped["choices"][0]
    assert choice["text"] == expected
    assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", stop)
    assert stopped["usage"]["completion_tokens"] < 30
    assert "".join(chunk["choices"][0]["text"] for chunk in streamed) == expected
    assert streamed[-1]["choices"][0]["finish_reason"] == "stop"
    assert included["choices"][0]["text"] == expected + stop


async def test_n_choices_are_indexed_and_differ() -> None:
    async with asgi_client(make_model()) as (client, _):
        body = (await client.post("/v1/chat/completions", json=chat_body(max_tokens=12, n=2))).json()
        chunks = sse_json((await client.post("/v1/chat/completions", json=chat_body(
            max_tokens=12, n=2, stream=True, stream_options={"include_usage": True}))).text)

    assert [choice["index"] for choice in body["choices"]] == [0, 1]
    texts = [choice["message"]["content"] for choice in body["choices"]]
    assert texts[0] != texts[1]
    assert body["usage"]["completion_tokens"] == 24

    streamed = {0: "", 1: ""}
    finished = set()
    for chunk in chunks[:-1]:
        (choice,) = chunk["choices"]
        streamed[choice["index"]] += choice["delta"].get("content", "")
        if choice["finish_reason"]:
            finished.add(choice["index"])
    assert [streamed[0], streamed[1]] == texts
    assert finished == {0, 1}
    assert chunks[-1]["usage"]["completion_tokens"] == 24


async def test_completions_accept_several_prompts_and_token_ids() -> None:
    async with asgi_client(make_model()) as (client, _):
        body = (await client.post("/v1/completions", json={"prompt": ["a b", "c d e"], "max_tokens": 3})).json()
        by_ids = (await client.post("/v1/completions", json={"prompt": [5, 6, 7, 8], "max_tokens": 3})).json()
        echoed = (await client.post("/v1/completions", json={"prompt": "say", "max_tokens": 2,
                                                             "echo": True})).json()
    assert [choice["index"] for choice in body["choices"]] == [0, 1]
    assert body["usage"]["prompt_tokens"] == 5 and body["usage"]["completion_tokens"] == 6
    assert by_ids["usage"]["prompt_tokens"] == 4
    assert echoed["choices"][0]["text"].startswith("say ")


async def test_streamed_completion_chunks_are_text_completion_objects() -> None:
    async with asgi_client(make_model()) as (client, _):
        response = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4, "stream": True})
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = [orjson.loads(event) for event in events[:-1]]
    assert all(chunk["object"] == "text_completion" and chunk["id"].startswith("cmpl-") for chunk in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_models_version_health_and_tokenize() -> None:
    async with asgi_client(make_model(engine_args={"max_model_len": 128})) as (client, _):
        models = (await client.get("/v1/models")).json()
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/version")).json() == {"version": "0.32.0"}
        chat_tokens = (await client.post("/tokenize", json={
            "messages": [{"role": "user", "content": "Hello, world"}], "return_token_strs": True})).json()
        completion = (await client.post("/v1/chat/completions", json=chat_body("Hello, world", max_tokens=1))).json()

    assert models["object"] == "list"
    (card,) = models["data"]
    assert (card["id"], card["object"], card["owned_by"], card["max_model_len"]) == (
        "mock-model", "model", "vllm", 128)
    assert card["root"] == "mock://mock-model"
    assert chat_tokens["count"] == len(chat_tokens["tokens"]) == completion["usage"]["prompt_tokens"]
    assert "Hello" in chat_tokens["token_strs"]
    assert chat_tokens["max_model_len"] == 128


async def test_embeddings_are_deterministic_unit_vectors() -> None:
    model = make_model(task="embed", embedding_dim=16)
    async with asgi_client(model) as (client, _):
        first = (await client.post("/v1/embeddings", json={"model": "mock-model", "input": ["a b c", "d"]})).json()
        again = (await client.post("/v1/embeddings", json={"input": "a b c"})).json()
        packed = (await client.post("/v1/embeddings", json={"input": "a b c", "encoding_format": "base64"})).json()

    assert first["object"] == "list" and first["id"].startswith("embd-")
    assert [item["index"] for item in first["data"]] == [0, 1]
    vector = first["data"][0]["embedding"]
    assert len(vector) == 16
    assert abs(sum(v * v for v in vector) - 1.0) < 1e-9
    assert again["data"][0]["embedding"] == vector
    assert first["data"][1]["embedding"] != vector
    assert first["usage"]["prompt_tokens"] == 4 and first["usage"]["total_tokens"] == 4
    unpacked = array.array("f", base64.b64decode(packed["data"][0]["embedding"])).tolist()
    assert all(abs(a - b) < 1e-6 for a, b in zip(unpacked, vector, strict=True))
