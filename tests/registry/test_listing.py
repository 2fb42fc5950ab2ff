"""`GET /v1/models` (OpenAI + OpenRouter legacy fields) and `/openrouter/models` (nested v2.4) from models.yaml."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import orjson
import pytest
from fastapi import FastAPI

from tests.registry.schemas import (
    LEGACY_LISTING,
    LEGACY_OPTIONAL,
    LEGACY_QUANTIZATIONS,
    LEGACY_REQUIRED,
    OPENAI_FIELDS,
    V24_LISTING,
    V24_QUANTIZATIONS,
    VLLM_FIELDS,
)
from worker.cli import models as models_cli
from worker.config import NodeConfig, load_node_config
from worker.registry import (
    OPENROUTER_V24_PATH,
    ModelCatalog,
    build_listing,
    build_listing_router,
    build_listing_v24,
    build_openai_listing,
    readiness_by_model,
)

REPO = Path(__file__).resolve().parents[2]
PRICES = {"prompt_per_mtok": "0.13", "completion_per_mtok": "0.38"}


def node(*models: dict[str, Any], datacenters: list[dict[str, str]] | None = None) -> NodeConfig:
    worker: dict[str, Any] = {"id": "node-1"}
    if datacenters is not None:
        worker["datacenters"] = datacenters
    return NodeConfig.model_validate({"worker": worker, "models": list(models)})


def rich_node() -> NodeConfig:
    """Every kind of model the listing has to describe."""
    return node(
        {"id": "chat", "source": "org/Chat-8B", "hugging_face_id": "org/Chat-8B", "quantization": "bf16",
         "engine_args": {"max_model_len": 8192, "max_num_seqs": 64, "enable_auto_tool_choice": True,
                         "tool_call_parser": "hermes", "reasoning_parser": "deepseek_r1", "max_logprobs": 5},
         "replicas": 2,
         "pricing": {**PRICES, "cached_prompt_per_mtok": "0.065", "request": "0.001"},
         "listing": {"name": "Chat 8B", "description": "A chat model.", "input_modalities": ["text", "image"],
                     "max_output_length": 4096, "deprecation_date": "2027-01-31", "openrouter_slug": "org/chat-8b"}},
        {"id": "quantized", "source": "org/Big-120B", "quantization": "MXFP4", "pricing": PRICES},
        {"id": "custom-quant", "source": "org/Other", "quantization": "awq", "pricing": PRICES},
        {"id": "unknown-quant", "source": "org/Odd", "quantization": "q3_k_m", "pricing": PRICES},
        {"id": "embedder", "source": "org/Embed", "task": "embed", "engine_args": {"dtype": "float16"},
         "pricing": {"prompt_per_mtok": "0.01", "completion_per_mtok": "0"}},
        {"id": "limited", "engine": "mock", "source": "org/Limited", "pricing": PRICES,
         "listing": {"supported_sampling_parameters": ["temperature", "stop"], "supported_features": []}},
        datacenters=[{"country_code": "US", "region": "us-east"}, {"country_code": "DE"}],
    )


def by_id(listing: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["id"]: entry for entry in listing["data"]}


@pytest.mark.parametrize("config", [rich_node(), load_node_config(REPO / "models.yaml"),
                                    load_node_config(REPO / "deploy/ionet/models.yaml")],
                         ids=["rich", "models.yaml", "ionet"])
def test_both_formats_match_the_router_schemas(config: NodeConfig) -> None:
    legacy = build_listing(config, lambda _: True, None, created=1_700_000_000)
    jsonschema.validate(legacy, LEGACY_LISTING)
    for entry in legacy["data"]:
        assert OPENAI_FIELDS | LEGACY_REQUIRED <= set(entry) <= OPENAI_FIELDS | VLLM_FIELDS | LEGACY_REQUIRED | LEGACY_OPTIONAL
    jsonschema.validate(build_listing_v24(config, lambda _: True, None, created=1_700_000_000), V24_LISTING)
    # And the JSON really is JSON (no Decimal, no date objects left).
    orjson.loads(orjson.dumps(legacy))


def test_legacy_fields_from_models_yaml() -> None:
    entries = by_id(build_listing(rich_node(), lambda _: True, None, created=123))
    chat = entries["chat"]
    assert (chat["object"], chat["created"], chat["owned_by"], chat["root"]) == ("model", 123, "node-1", "org/Chat-8B")
    assert chat["name"] == "Chat 8B"
    assert chat["hugging_face_id"] == "org/Chat-8B"
    assert chat["context_length"] == chat["max_model_len"] == 8192
    assert chat["max_output_length"] == 4096
    assert chat["pricing"] == {"prompt": "0.00000013", "completion": "0.00000038", "input_cache_read": "0.000000065",
                               "image": "0", "request": "0.001"}
    assert chat["input_modalities"] == ["text", "image"]
    assert chat["output_modalities"] == ["text"]
    assert chat["supported_features"] == ["tools", "json_mode", "structured_outputs", "logprobs", "reasoning"]
    assert "top_a" not in chat["supported_sampling_parameters"]  # vLLM has no top_a
    assert chat["description"] == "A chat model."
    assert chat["deprecation_date"] == "2027-01-31"
    assert chat["openrouter"] == {"slug": "org/chat-8b"}
    assert chat["datacenters"] == [{"country_code": "US"}, {"country_code": "DE"}]

    # Defaults: name is the id, no Hugging Face id is "", no tools without a tool parser.
    plain = entries["quantized"]
    assert plain["name"] == "quantized"
    assert plain["hugging_face_id"] == ""
    assert plain["supported_features"] == ["json_mode", "structured_outputs", "logprobs"]
    assert plain["max_output_length"] == plain["context_length"] == 4096

    embedder = entries["embedder"]
    assert embedder["output_modalities"] == ["embeddings"]
    assert embedder["supported_sampling_parameters"] == [] and embedder["supported_features"] == []
    assert embedder["max_output_length"] is None
    limited = entries["limited"]
    assert limited["supported_sampling_parameters"] == ["temperature", "stop"]
    assert limited["supported_features"] == []


@pytest.mark.parametrize(
    ("label", "dtype", "legacy", "v24"),
    [
        ("bf16", None, "bf16", "bf16"),
        ("FP8", None, "fp8", "fp8"),
        ("mxfp4", None, "fp4", "mxfp4"),
        ("nvfp4", None, "fp4", "nvfp4"),
        ("mxfp8", None, "fp8", "mxfp8"),
        ("awq", None, "int4", "int4"),
        ("gptq", None, "int4", "int4"),
        ("w8a8", None, "int8", "int8"),
        ("bfloat16", None, "bf16", "bf16"),
        (None, "float16", "fp16", "fp16"),
        (None, "auto", None, None),
        (None, None, None, None),
        ("q3_k_m", None, None, None),
    ],
)
def test_quantization_is_always_in_the_enum(label: str | None, dtype: str | None, legacy: str | None,
                                            v24: str | None) -> None:
    model: dict[str, Any] = {"id": "m", "source": "s", "pricing": PRICES}
    if label is not None:
        model["quantization"] = label
    if dtype is not None:
        model["engine_args"] = {"dtype": dtype}
    config = node(model)
    legacy_entry = build_listing(config, None)["data"][0]
    v24_entry = build_listing_v24(config, None)["data"][0]
    assert legacy_entry.get("quantization") == legacy
    assert ("quantization" in legacy_entry) == (legacy is not None)  # unknown: left out, never guessed
    assert v24_entry["quantization"] == v24  # unknown: null
    assert legacy_entry.get("quantization", "bf16") in LEGACY_QUANTIZATIONS
    assert v24_entry["quantization"] in [*V24_QUANTIZATIONS, None]


def test_is_ready_follows_readiness_per_model_and_is_omitted_without_it() -> None:
    config = rich_node()
    ready = {"chat", "embedder"}
    legacy = by_id(build_listing(config, lambda model_id: model_id in ready))
    assert {model_id for model_id, entry in legacy.items() if entry["is_ready"]} == ready
    v24 = by_id(build_listing_v24(config, lambda model_id: model_id in ready))
    assert {model_id for model_id, entry in v24.items() if entry["is_ready"]} == ready
    assert all("is_ready" not in entry for entry in build_listing(config, None)["data"])
    assert all("is_ready" not in entry for entry in build_listing_v24(config, None)["data"])


def test_readiness_by_model_reads_replica_states() -> None:
    detail: dict[str, Any] = {"draining": False, "models": {"a": ["starting", "saturated"], "b": ["unhealthy"],
                                                            "c": ["ready"]}}
    model_ready = readiness_by_model(lambda: (False, detail))
    assert [model_ready(m) for m in ("a", "b", "c", "unknown")] == [True, False, True, False]
    detail["draining"] = True
    assert not model_ready("c")


def test_engine_context_length_wins_over_models_yaml() -> None:
    config = rich_node()
    reported = {"chat": 2048, "quantized": None}
    entries = by_id(build_listing(config, None, reported.get))
    assert entries["chat"]["context_length"] == entries["chat"]["max_model_len"] == 2048
    assert entries["chat"]["max_output_length"] == 2048  # clipped to what the engine can hold
    assert entries["quantized"]["context_length"] == 4096  # nothing reported: models.yaml's value
    chat_v24 = by_id(build_listing_v24(config, None, reported.get))["chat"]
    text_in = chat_v24["input_modalities"][0]
    assert text_in["max_context_length"] == {"value": 2048, "unit": "token"}
    assert text_in["max_prompt_length"] == {"value": 2047, "unit": "token"}
    assert build_openai_listing(config, reported.get)["data"][0]["max_model_len"] == 2048


def test_v24_nested_details() -> None:
    entries = by_id(build_listing_v24(rich_node(), None, created=5))
    chat = entries["chat"]
    assert chat["created"] == 5 and chat["quantization"] == "bf16" and chat["hugging_face_id"] == "org/Chat-8B"
    assert chat["datacenters"] == [{"country_code": "US", "region": "us-east"}, {"country_code": "DE"}]
    text_in, image_in = chat["input_modalities"]
    assert text_in["pricing"] == [
        {"type": "prompt", "unit": "token", "cost_usd": "0.00000013"},
        {"type": "cached_prompt", "unit": "token", "cost_usd": "0.000000065"},
        {"type": "request", "unit": "request", "cost_usd": "0.001"},
    ]
    assert image_in == {"type": "image", "pricing": [], "capacity": []}
    (text_out,) = chat["output_modalities"]
    assert text_out["streaming"] is True
    assert text_out["max_output_length"] == {"value": 4096, "unit": "token"}
    assert text_out["pricing"] == [{"type": "completion", "unit": "token", "cost_usd": "0.00000038"},
                                   {"type": "internal_reasoning", "unit": "token", "cost_usd": "0.00000038"}]
    assert text_out["capacity"] == [{"type": "concurrency", "unit": "request", "value": 128}]  # 2 x 64
    parameters = text_out["supported_parameters"]
    assert parameters["temperature"] == {"type": "range", "min": 0, "max": 2}
    assert parameters["stop"] == {"type": "array", "max_items": 4}
    assert parameters["max_tokens"] == {"type": "range", "min": 1, "max": 4096}
    assert parameters["top_logprobs"] == {"type": "range", "min": 0, "max": 5}
    for feature_parameter in ("tools", "tool_choice", "response_format", "structured_outputs", "reasoning"):
        assert parameters[feature_parameter] == {"type": "boolean"}
    assert "top_a" not in parameters  # missing key = unsupported

    limited = entries["limited"]["output_modalities"][0]["supported_parameters"]
    assert set(limited) == {"temperature", "stop"}
    embedder = entries["embedder"]
    assert embedder["quantization"] == "fp16"
    assert embedder["output_modalities"][0]["type"] == "embeddings"
    assert embedder["output_modalities"][0]["streaming"] is False
    assert embedder["input_modalities"][0]["max_prompt_length"] == {"value": 4096, "unit": "token"}


async def test_openrouter_route_serves_v24() -> None:
    catalog = ModelCatalog(rich_node(), readiness=lambda model_id: model_id == "chat", created=7)
    app = FastAPI()
    app.include_router(build_listing_router(catalog))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://worker") as client:
        response = await client.get(OPENROUTER_V24_PATH)
    assert response.status_code == 200
    body = response.json()
    jsonschema.validate(body, V24_LISTING)
    assert by_id(body)["chat"]["is_ready"] is True and by_id(body)["limited"]["is_ready"] is False
    assert catalog.listing()["data"][0]["created"] == 7


def run_models_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="worker")
    models_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["models", "--config", str(REPO / "models.yaml"), *argv])
    assert args.handler(args) == 0
    return orjson.loads(capsys.readouterr().out)


def test_models_cli_formats(capsys: pytest.CaptureFixture[str]) -> None:
    legacy = run_models_cli(capsys)
    jsonschema.validate(legacy, LEGACY_LISTING)
    assert all("is_ready" not in entry for entry in legacy["data"])  # no engines running: not claimed
    assert legacy["data"][1]["pricing"]["prompt"] == "0.00000013"

    v24 = run_models_cli(capsys, "--format", "openrouter-v2.4")
    jsonschema.validate(v24, V24_LISTING)
    assert all("is_ready" not in entry for entry in v24["data"])

    openai = run_models_cli(capsys, "--format", "openai")
    assert [set(entry) for entry in openai["data"]] == [OPENAI_FIELDS | VLLM_FIELDS] * 2
    assert [entry["id"] for entry in openai["data"]] == [entry["id"] for entry in legacy["data"]]
