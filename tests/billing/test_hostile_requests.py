"""Hostile and broken requests lose nothing: no replica slot, no balance hold, no money, no ledger record.

A whole node runs in this process (uvicorn on a free port, real mock-engine processes, the ledger on SQLite
and on PostgreSQL) so that faults can be injected at every step of a request, from authentication to its
last byte, and what the request held can be read back afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import orjson
import pytest
import pytest_asyncio

from tests.billing.support import fresh_database, make_key
from tests.support.worker_process import eventually, fast_mock_model, serving
from worker.billing.disclosure import DisclosureHook
from worker.billing.store.records import LedgerFilter, LedgerRecord
from worker.config import NodeConfig, Settings
from worker.gateway import gateway as gateway_module
from worker.gateway.access_log import AccessLog
from worker.gateway.context import Usage
from worker.gateway.gateway import Gateway
from worker.gateway.relay import SseRelay
from worker.node import WorkerNode

MODEL = "acme/hostile"
PROMPT_WORDS = 3000


@dataclass
class Served:
    node: WorkerNode
    client: httpx.AsyncClient
    key: str
    account_id: str

    @property
    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.key}"}

    def sdk(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.v1, api_key=self.key, max_retries=0)

    @property
    def v1(self) -> str:
        return str(self.client.base_url).rstrip("/") + "/v1"

    async def records(self, request_id: str) -> list[LedgerRecord]:
        store = self.node.billing.store  # type: ignore[union-attr]
        await store.flush()
        return await store.query_ledger(LedgerFilter(request_id=request_id), limit=10)

    async def assert_nothing_held(self) -> None:
        """No replica slot, no balance hold (in this worker or in the database) is left behind."""
        billing = self.node.billing
        assert billing is not None
        assert await eventually(lambda: _true(all(r.in_flight == 0 for r in self.node.supervisor.replicas)),
                                timeout_s=10)
        assert await eventually(lambda: _true(billing.backlog().reservations_held == 0), timeout_s=10)
        await billing.store.flush()
        account = await billing.store.get_account(self.account_id)
        assert account is not None and account.reserved_micro == 0


async def _true(value: bool) -> bool:
    return value


@contextlib.asynccontextmanager
async def serve_node(tmp_path: Any, db_url: str) -> AsyncIterator[Served]:
    config = NodeConfig.model_validate({
        "worker": {"id": "hostile-node"},
        "models": [fast_mock_model(
            MODEL, engine_args={"max_model_len": 8192, "max_num_seqs": 16},
            mock={"step_base_ms": 5.0, "step_per_seq_ms": 0.0, "prefill_per_token_ms": 0.0},
        )],
    })
    settings = Settings(auth=True, db_url=db_url, admin_token=None)
    node = WorkerNode(config, settings, gpu_count=0)
    async with serving(node.app) as base_url, httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        assert await eventually(lambda: _ready(client), timeout_s=60)
        assert node.billing is not None
        funded = await make_key(node.billing.store, balance_micro=100_000_000)
        yield Served(node, client, funded.plaintext, funded.account.id)


async def _ready(client: httpx.AsyncClient) -> bool:
    return (await client.get("/health/ready")).status_code == 200


# One node per ledger store for the whole module: starting one (engines included) takes seconds.
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module",
                        params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Served]:
    tmp_path = tmp_path_factory.mktemp("hostile")
    async with fresh_database(request.param, tmp_path) as db_url, serve_node(tmp_path, db_url) as node:
        yield node


def _chat(stream: bool, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 8,
            "stream": stream, **extra}


def _boom(*_: Any, **__: Any) -> Any:
    raise RuntimeError("injected fault")


async def _async_boom(*_: Any, **__: Any) -> Any:
    raise RuntimeError("injected fault")


def _nothing_free(*_: Any, **__: Any) -> None:
    return None  # every replica full: the request queues


# Every step between authentication and the last byte where the worker's own code can fail.
FAULTS: dict[str, Callable[[pytest.MonkeyPatch, WorkerNode], None]] = {
    "admission": lambda mp, node: mp.setattr(node.capacity.admission, "admit_now", _boom),
    "waiting in the queue": lambda mp, node: (mp.setattr(node.capacity.admission, "admit_now", _nothing_free),
                                              mp.setattr(node.capacity.admission, "wait_for_slot", _async_boom)),
    "body re-serialisation": lambda mp, node: mp.setattr(Gateway, "engine_payload", _boom),
    "provenance after routing": lambda mp, node: mp.setattr(DisclosureHook, "after_route", _boom),
    "engine connect": lambda mp, node: mp.setattr(gateway_module, "open_upstream", _async_boom),
    "relay": lambda mp, node: (mp.setattr(SseRelay, "process", _boom),
                               mp.setattr(gateway_module, "finish", _async_boom)),
    "usage parsing": lambda mp, node: mp.setattr(Usage, "from_openai", classmethod(_boom)),
    "finalize: the access log": lambda mp, node: mp.setattr(AccessLog, "finalize", _async_boom),
    "finalize: the charge": lambda mp, node: mp.setattr("worker.billing.service.charge_micro", _boom),
}


async def _send(served: Served, body: dict[str, Any], request_id: str) -> tuple[int, list[str]]:
    """Status, and the stream's data lines (empty for a plain answer)."""
    headers = {**served.headers, "x-request-id": request_id}
    async with served.client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
        lines = [line async for line in response.aiter_lines() if line.startswith("data: ")]
        return response.status_code, lines if body["stream"] else []


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_a_fault_at_any_step_is_recorded_once_and_holds_nothing(
    served: Served, stream: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    for number, (step, inject) in enumerate(FAULTS.items()):
        request_id = f"fault-{number}-{'stream' if stream else 'plain'}"
        with monkeypatch.context() as patch:
            inject(patch, served.node)
            status, lines = await _send(served, _chat(stream), request_id)
        await served.assert_nothing_held()
        records = await served.records(request_id)
        assert len(records) == 1, (step, records)
        [record] = records
        if step.startswith("finalize"):  # the answer was complete; only the accounting failed
            assert status == 200, step
            continue
        assert record.cost_micro == 0, step
        assert record.outcome == "worker_error", (step, record.outcome)
        if status == 200:  # the fault came after the stream's first byte: ended the router's way
            assert stream, step
            assert lines[-1] == "data: [DONE]", step
            assert orjson.loads(lines[-2][len("data: "):])["choices"][0]["finish_reason"] == "error", step
        else:
            assert status == 500, step
    # And the node still serves: nothing it needs was lost on the way.
    status, _ = await _send(served, _chat(stream), "after-the-faults")
    assert status == 200


DEEP = {"x": orjson.loads("[" * 300 + "]" * 300)}


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": "20"}, "n"),
        ({"n": 20.0}, "n"),
        ({"n": True}, "n"),
        ({"n": 0}, "n"),
        ({"max_tokens": "100"}, "max_tokens"),
        ({"max_completion_tokens": 1.5}, "max_completion_tokens"),
        ({"top_logprobs": "5"}, "top_logprobs"),
        ({"logprobs": 1}, "logprobs"),
        ({"stream": "yes"}, "stream"),
        ({"min_tokens": 50}, "min_tokens"),  # above max_tokens 8: the engine would generate past the budget
        ({"messages": [["not", "an", "object"]]}, "messages"),
        (DEEP, None),
    ],
)
async def test_priced_fields_are_validated_with_their_openai_type_before_any_hold(
    served: Served, extra: dict[str, Any], param: str | None
) -> None:
    request_id = f"invalid-{param}"
    body = {**_chat(False), **extra}
    status, _ = await _send(served, body, request_id)
    assert status == 400
    response = await served.client.post("/v1/chat/completions", json=body, headers=served.headers)
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    await served.assert_nothing_held()
    assert await served.records(request_id) == []  # refused before anything was reserved or recorded


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "hi", "best_of": "4"}, "best_of"),
        ({"prompt": "hi", "n": 3, "best_of": 2}, "best_of"),
        ({"prompt": ["a", 1]}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": "hi", "logprobs": 21}, "logprobs"),
        ({"prompt": "hi", "echo": "true"}, "echo"),
    ],
)
async def test_completions_prompt_lists_and_counts_are_validated(
    served: Served, body: dict[str, Any], param: str | None
) -> None:
    response = await served.client.post("/v1/completions", json={"model": MODEL, "max_tokens": 4, **body},
                                        headers=served.headers)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param
    await served.assert_nothing_held()


async def test_string_n_cannot_overdraw_a_nearly_empty_account(served: Served) -> None:
    """Found: `n: "20"` was priced as one sequence and generated twenty, taking the balance below zero."""
    billing = served.node.billing
    assert billing is not None
    poor = await make_key(billing.store, balance_micro=100)
    sdk = openai.AsyncOpenAI(base_url=served.v1, api_key=poor.plaintext, max_retries=0)
    with pytest.raises(openai.BadRequestError) as refused:
        await sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=8, n="20")  # type: ignore[arg-type]
    assert refused.value.param == "n"  # type: ignore[attr-defined]
    with pytest.raises(openai.APIStatusError) as unaffordable:
        await sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=64, n=20)
    assert unaffordable.value.status_code == 402
    account = await billing.store.get_account(poor.account.id)
    assert account is not None and account.balance_micro == 100 and account.reserved_micro == 0


async def test_the_engine_receives_the_validated_body(served: Served) -> None:
    """What was priced is what runs: n sequences are reserved, generated and charged."""
    answer = await served.sdk().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4, n=3)
    assert len(answer.choices) == 3
    assert answer.usage is not None and answer.usage.completion_tokens == 12
    await served.assert_nothing_held()


async def test_deep_nesting_in_any_field_cannot_fill_the_model(served: Served) -> None:
    """Found: 300-deep JSON outside `messages` answered 500 after the hold and lease were taken, and kept
    both; ~260 such requests made the model refuse every key."""
    for number in range(40):
        status, _ = await _send(served, {**_chat(False), **DEEP}, f"deep-{number}")
        assert status == 400
    await served.assert_nothing_held()
    status, _ = await _send(served, _chat(False), "after-deep")
    assert status == 200


async def test_an_abandoned_stream_pays_for_its_prompt_and_what_was_generated(served: Served) -> None:
    """Found: a client that read 3 events of a 3,000-token prompt's stream and left paid prompt 0."""
    prompt = " ".join(["word"] * PROMPT_WORDS)
    stream = await served.sdk().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=500, stream=True,
        extra_headers={"x-request-id": "abandoned-stream"})
    received = 0
    async for _ in stream:
        received += 1
        if received == 3:
            break
    await stream.close()
    assert await eventually(lambda: _records_exist(served, "abandoned-stream"), timeout_s=15)
    [record] = await served.records("abandoned-stream")
    assert record.outcome == "client_disconnected"
    assert record.prompt_tokens >= PROMPT_WORDS  # counted by the model's tokenizer, chat template included
    assert record.prompt_tokens_source == "tokenizer"
    assert 2 <= record.completion_tokens < 500 and record.completion_tokens_source == "stream"
    assert record.usage_estimated  # the completion was counted from events, not by the engine
    # Prompt at $1/Mtok, completion at $2/Mtok, in micro-USD: what the engine did, not less.
    assert record.cost_micro >= record.prompt_tokens * 1 + record.completion_tokens * 2 - 1
    await served.assert_nothing_held()


async def _records_exist(served: Served, request_id: str) -> bool:
    return bool(await served.records(request_id))


async def test_an_abandoned_stream_on_a_dead_engine_estimates_its_prompt(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where no tokenizer answers, the prompt is estimated (four bytes a token) and flagged as estimated."""
    from worker.gateway import prompt_count

    monkeypatch.setattr(prompt_count, "_tokenize", _async_boom)
    prompt = " ".join(["word"] * 400)
    stream = await served.sdk().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=500, stream=True,
        extra_headers={"x-request-id": "abandoned-estimated"})
    async for _ in stream:
        break
    await stream.close()
    assert await eventually(lambda: _records_exist(served, "abandoned-estimated"), timeout_s=15)
    [record] = await served.records("abandoned-estimated")
    assert record.prompt_tokens_source == "estimate"
    assert record.prompt_tokens == -(-len(orjson.dumps([{"role": "user", "content": prompt}])) // 4)
    assert record.usage_estimated and record.cost_micro > 0
