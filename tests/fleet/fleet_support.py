"""Workers on the mock engine behind LiteLLM's Router: their configs, the router, and who answered.

Each worker is one LiteLLM deployment of the same model. `order` ranks them: LiteLLM sends every request
to the lowest order it may use and moves to the next only when that one refuses or is cooling down.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from litellm import Router
from prometheus_client.parser import text_string_to_metric_families

from tests.support.worker_process import fast_mock_model

MODEL = "acme/fleet-tiny"
# A second model group serving the same model: the target of LiteLLM's cross-group `fallbacks`.
RESERVE_GROUP = "acme/fleet-tiny-reserve"
ADMIN_TOKEN = "fleet-admin-token-0123456789abcdef"
# Engine stats may age on a busy 2-core machine without a backup worker counting as saturated.
ENGINE_HEALTH = {"stats_interval_s": 0.1, "stats_stale_after_s": 2.0, "probe_interval_s": None}
PROMPT = [{"role": "user", "content": "tell me a story"}]
# LiteLLM's own types trip a pydantic warning as they load; it says nothing about the worker.
QUIET_LITELLM = pytest.mark.filterwarnings("ignore:Items? .*ReadOnly:UserWarning")


def worker_config(worker_id: str, *, step_ms: float, max_num_seqs: int,
                  ttft_objective_s: float = 10.0) -> dict[str, Any]:
    """models.yaml of a worker with one mock replica whose every engine step takes `step_ms`."""
    model = fast_mock_model(MODEL, engine_args={"max_model_len": 2048, "max_num_seqs": max_num_seqs},
                            mock={"step_base_ms": step_ms, "step_per_seq_ms": 0.0, "prefill_per_token_ms": 0.0},
                            admission={"ttft_objective_s": ttft_objective_s})
    return {"worker": {"id": worker_id, "engine_health": ENGINE_HEALTH, "restart_backoff_initial_s": 0.2},
            "models": [model]}


def deployment(base_url: str, *, order: int, group: str = MODEL) -> dict[str, Any]:
    """A worker as LiteLLM sees it: an OpenAI-compatible server at `base_url`/v1 serving MODEL."""
    return {"model_name": group,
            "litellm_params": {"model": f"openai/{MODEL}", "api_base": f"{base_url}/v1",
                               "api_key": "unused", "order": order}}


def fleet_router(preferred_first: Sequence[str], reserve: str | None = None) -> Router:
    """LiteLLM in front of the workers at `preferred_first` (order 1, 2, ...), with `reserve` as a fallback group.

    - num_retries=0: a retry picks from the same lowest order again, so it would only knock on the worker
      that just refused; the order fallback is what moves a refused request to the next worker.
    - allowed_fails=0: the first refusal takes a worker out of the picks ("cooldown") for as long as its
      Retry-After says (LiteLLM prefers that header to cooldown_time), so a saturated or draining worker is
      not asked again until it said it would have room.
    - cooldown_time: only for failures without Retry-After (a worker that does not answer at all).
    """
    model_list = [deployment(url, order=rank) for rank, url in enumerate(preferred_first, start=1)]
    fallbacks: list[dict[str, list[str]]] = []
    if reserve is not None:
        model_list.append(deployment(reserve, order=1, group=RESERVE_GROUP))
        fallbacks.append({MODEL: [RESERVE_GROUP]})
    return Router(model_list=model_list, fallbacks=fallbacks, num_retries=0, allowed_fails=0,
                  cooldown_time=5, timeout=60)


@dataclass(frozen=True)
class Answer:
    """One request as the client of the router saw it."""

    worker_id: str  # the worker's x-worker-id, relayed by LiteLLM
    replica: str  # x-worker-replica
    text: str
    finish_reason: str | None
    fallbacks: int  # LiteLLM's x-litellm-attempted-fallbacks: deployments it moved past for this request

    @property
    def complete(self) -> bool:
        return bool(self.text) and self.finish_reason == "length"


def _provenance(hidden_params: dict[str, Any]) -> dict[str, Any]:
    # LiteLLM keeps the provider's response headers with an "llm_provider-" prefix, next to its own.
    headers = hidden_params["additional_headers"]
    return {"worker_id": headers["llm_provider-x-worker-id"], "replica": headers["llm_provider-x-worker-replica"],
            "fallbacks": int(headers.get("x-litellm-attempted-fallbacks") or 0)}


async def ask(router: Router, *, stream: bool, max_tokens: int = 8) -> Answer:
    """Send one chat completion through the router and read it to the end."""
    if not stream:
        response = await router.acompletion(model=MODEL, messages=PROMPT, max_tokens=max_tokens)
        choice = response.choices[0]
        return Answer(text=choice.message.content or "", finish_reason=choice.finish_reason,
                      **_provenance(response._hidden_params))
    chunks = await router.acompletion(model=MODEL, messages=PROMPT, max_tokens=max_tokens, stream=True)
    text, finish_reason = [], None
    async for chunk in chunks:
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
            finish_reason = choice.finish_reason or finish_reason
    return Answer(text="".join(text), finish_reason=finish_reason, **_provenance(chunks._hidden_params))


async def ask_mixed(router: Router, count: int, *, max_tokens: int = 8) -> list[Answer]:
    """`count` requests one after the other, streaming and not by turns."""
    return [await ask(router, stream=index % 2 == 0, max_tokens=max_tokens) for index in range(count)]


async def ask_until_served_by(router: Router, worker_id: str, timeout_s: float = 30.0) -> list[Answer]:
    """Requests one after the other until `worker_id` serves one (it is last); all of them, for checking."""
    answers: list[Answer] = []
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        answers.append(await ask(router, stream=len(answers) % 2 == 0))
        if answers[-1].worker_id == worker_id:
            return answers
        await asyncio.sleep(0.2)
    raise AssertionError(f"{worker_id} served none of {len(answers)} requests in {timeout_s}s: {answers[-3:]}")


def served_by(answers: Sequence[Answer]) -> set[str]:
    return {answer.worker_id for answer in answers}


async def metric(base_url: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` on a worker's /metrics whose labels include `labels`."""
    async with httpx.AsyncClient(timeout=10) as client:
        text = (await client.get(f"{base_url}/metrics")).text
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))


async def refusals(base_url: str, reason: str | None = None) -> float:
    """Requests the worker's admission refused (all reasons, or one: draining, unavailable, in_flight, ...)."""
    labels = {"model": MODEL} | ({"reason": reason} if reason else {})
    return await metric(base_url, "worker_admission_rejections_total", **labels)


async def served_count(base_url: str) -> float:
    return await metric(base_url, "worker_requests_total", model=MODEL, status="200")


async def admin(base_url: str, action: str) -> None:
    """POST /admin/drain or /admin/undrain."""
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.post(f"{base_url}/admin/{action}", headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
    response.raise_for_status()

