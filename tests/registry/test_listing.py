"""`GET /v1/models` (OpenAI + OpenRouter legacy fields) and `/openrouter/models` (schema 2.4) from models.yaml.

Checked against OpenRouter's "Provider Integration" pages: JSON Schemas written from them (schemas.py)
and example documents in their exact shape (fixtures/, see fixtures/SOURCE.md), key for key.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from fastapi import FastAPI

from tests.registry.schemas import (
    LEGACY_EXAMPLE,
    LEGACY_LISTING,
    LEGACY_OPTIONAL,
    LEGACY_REQUIRED,
    LEGACY_SAMPLING_PARAMETERS,
    OPENAI_FIELDS,
    PRICE_PATTERN,
    QUANTIZATIONS,
    V24_LISTING,
    VLLM_FIELDS,
    validator,
)
from worker.api import OPENROUTER_V24_PATH, build_listing_router
from worker.cli import models as models_cli
from worker.config import NodeConfig, load_node_config
from worker.registry import (
    ModelCatalog,
    build_listing,
    build_listing_v24,
    build_openai_listing,
    readiness_by_model,
)
from worker.registry.checkpoint import checkpoint_quantization
from worker.registry.describe import display_name

REPO = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).parent / "fixtures"
PRICES = {"prompt_per_mtok": "0.13", "completion_per_mtok": "0.38"}
V24 = validator(V24_LISTING)
LEGACY = validator(LEGACY_LISTING)


def fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


def assert_valid(checker: Any, document: Any) -> None:
    errors = [f"{error.json_path}: {error.message}" for error in checker.iter_errors(document)]
    assert not errors, "\n".join(errors)


def node(*models: dict[str, Any], datacenters: list[dict[str, str]] | None = None) -> NodeConfig:
    worker: dict[str, Any] = {"id": "node-1"}
    if datacenters is not None:
        worker["datacenters"] = datacenters
    return NodeConfig.model_validate({"worker": worker, "models": list(models)})


FULL_LISTING = {"name": "Chat 8B", "description": "A chat model.", "tokenizer": "Llama3",
                "input_modalities": ["text", "image"], "max_output_length": 4096,
                "deprecation_date": "2027-01-31", "openrouter_slug": "org/chat-8b", "is_free": False,
                "discount_to_user": 0.1, "capacity_tpm": 2_000_000, "deployment_region": "US",
                "compliance": {"zdr": True, "hipaa": False}}


def rich_node() -> NodeConfig:
    """Every kind of model the listing has to describe."""
    return node(
        {"id": "chat", "source": "org/Chat-8B", "hugging_face_id": "org/Chat-8B", "quantization": "bf16",
         "engine_args": {"max_model_len": 8192, "max_num_seqs": 64, "enable_auto_tool_choice": True,
                         "tool_call_parser": "hermes", "reasoning_parser": "deepseek_r1", "max_logprobs": 5},
         "replicas": 2,
         "pricing": {**PRICES, "cached_prompt_per_mtok": "0.065", "request": "0.001"},
         "listing": FULL_LISTING},
        {"id": "openai/gpt-oss-120b", "source": "openai/gpt-oss-120b", "quantization": "MXFP4", "pricing": PRICES},
        {"id": "custom-quant", "source": "org/Other", "quantization": "awq", "pricing": PRICES},
        {"id": "unknown-quant", "source": "org/Odd", "quantization": "q3_k_m", "pricing": PRICES},
        {"id": "embedder", "source": "org/Embed", "task": "embed", "engine_args": {"dtype": "float16"},
         "pricing": {"prompt_per_mtok": "0.01", "completion_per_mtok": "0"}},
        {"id": "limited", "engine": "mock", "source": "org/Limited", "pricing": PRICES,
         "listing": {"supported_sampling_parameters": ["temperature", "stop", "top_logprobs"],
                     "supported_features": []}},
        {"id": "free-model", "source": "org/Free", "quantization": "fp8",
         "pricing": {"prompt_per_mtok": "0", "completion_per_mtok": "0", "cached_prompt_per_mtok": "0"}},
        datacenters=[{"country_code": "US", "region": "us-east"}, {"country_code": "DE"}],
    )


def by_id(listing: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["id"]: entry for entry in listing["data"]}


def test_the_fixtures_are_valid_documents_of_their_format() -> None:
    """The schemas accept the pages' examples, so a failure below is the worker's, not the schema's."""
    assert_valid(V24, fixture("openrouter_v24_example.json"))
    assert_valid(validator(LEGACY_EXAMPLE), fixture("openrouter_legacy_example.json"))
    # And they are strict: the deviations the worker used to have are refused.
    example = fixture("openrouter_v24_example.json")
    document = example["data"][0]
    text_in, text_out = document["input_modalities"][0], document["output_modalities"][0]
    deviations: list[tuple[str, Any]] = [
        ("schema_version at the list root", {**example, "schema_version": "2.4"}),
        ("limits on the text input itself", {"data": [{**document, "input_modalities": [
            {**text_in, "max_context_length": {"value": 1, "unit": "token"}}]}]}),
        ("a request price on the text input", {"data": [{**document, "input_modalities": [
            {**text_in, "pricing": [{"type": "request", "unit": "request", "cost_usd": "0"}]}]}]}),
        ("max_output_length on the output", {"data": [{**document, "output_modalities": [
            {**text_out, "max_output_length": {"value": 1, "unit": "token"}}]}]}),
        ("max_tokens as a fractional range", {"data": [{**document, "output_modalities": [
            {**text_out, "supported_parameters": {"max_tokens": {"type": "integer", "min": 1, "max": 2.5}}}]}]}),
        ("a null hugging_face_id", {"data": [{**document, "hugging_face_id": None}]}),
    ]
    for what, wrong in deviations:
        assert list(V24.iter_errors(wrong)), what


@pytest.mark.parametrize("config", [rich_node(), load_node_config(REPO / "models.yaml"),
                                    load_node_config(REPO / "deploy/ionet/models.yaml")],
                         ids=["rich", "models.yaml", "ionet"])
def test_both_formats_match_the_documented_schemas(config: NodeConfig) -> None:
    legacy = build_listing(config, lambda _: True, None, created=1_700_000_000)
    assert_valid(LEGACY, legacy)
    for entry in legacy["data"]:
        documented = OPENAI_FIELDS | VLLM_FIELDS | LEGACY_REQUIRED | LEGACY_OPTIONAL
        assert OPENAI_FIELDS | LEGACY_REQUIRED <= set(entry) <= documented
    v24 = build_listing_v24(config, lambda _: True, None, created=1_700_000_000)
    assert_valid(V24, v24)
    for entry in v24["data"]:
        assert entry["schema_version"] == "2.4"
        assert "pricing" not in entry or {price["type"] for price in entry["pricing"]} <= {"request", "web_search"}
        for modality in entry["input_modalities"] + entry["output_modalities"]:
            kinds = [price["type"] for price in modality.get("pricing", [])]
            assert len(kinds) == len(set(kinds)) and "request" not in kinds
            for price in modality.get("pricing", []):
                assert price["cost_usd"] != "0" or price["type"] == "cached_prompt"  # never zero-stuffed
    # And the JSON really is JSON (no Decimal, no date objects left), with the worker's exact price strings.
    for document in (legacy, v24):
        text = orjson.dumps(document).decode()
        orjson.loads(text)
    assert all(re.match(PRICE_PATTERN, price) for entry in legacy["data"] for price in entry["pricing"].values())


def _keys(value: Mapping[str, Any]) -> set[str]:
    return set(value)


def test_v24_keys_match_the_documented_example_key_for_key() -> None:
    example = fixture("openrouter_v24_example.json")["data"]
    documented, documented_embedder = example[0], example[1]
    entries = by_id(build_listing_v24(rich_node(), lambda _: True, None, created=5))
    chat = entries["chat"]
    # Every key of the page's document; the worker declares no provider-specific passthrough parameters
    # and no request-rate limit of its own (its 429s come from live admission, not a declared rate).
    assert _keys(chat) == _keys(documented) - {"passthrough_parameters", "capacity"}
    assert list(chat) == [key for key in documented if key in chat]  # and in the page's order

    text_in, image_in = chat["input_modalities"]
    documented_text, documented_image = documented["input_modalities"][0], documented["input_modalities"][1]
    assert _keys(text_in) == _keys(documented_text)
    assert _keys(text_in["supported_inputs"]) == _keys(example[1]["input_modalities"][0]["supported_inputs"])
    for limit in text_in["supported_inputs"].values():
        assert _keys(limit) == _keys(documented_text["supported_inputs"]["max_context_length"])
    assert _keys(image_in) <= _keys(documented_image)
    for ours, theirs in ((text_in["pricing"], documented_text["pricing"]),
                         (text_in["capacity"], documented_text["capacity"])):
        assert {frozenset(entry) for entry in ours} == {frozenset(theirs[0])}

    (text_out,) = chat["output_modalities"]
    documented_out = documented["output_modalities"][0]
    assert _keys(text_out) == _keys(documented_out)
    assert _keys(text_out["max_length"]) == _keys(documented_out["max_length"])
    for name, descriptor in documented_out["supported_parameters"].items():
        assert name in text_out["supported_parameters"], name
        assert text_out["supported_parameters"][name]["type"] == descriptor["type"], name
        assert _keys(text_out["supported_parameters"][name]) == _keys(descriptor), name
    assert [entry["type"] for entry in text_out["pricing"]] == [entry["type"] for entry in documented_out["pricing"]]
    assert _keys(chat["datacenters"][0]) == _keys(documented["datacenters"][0])
    assert _keys(chat["compliance"]) == _keys(documented["compliance"])
    assert _keys(chat["openrouter"]) == _keys(documented["openrouter"])

    embedder = entries["embedder"]
    assert _keys(embedder) <= _keys(documented_embedder) | {"is_ready", "datacenters"}
    (embeddings_out,) = embedder["output_modalities"]
    assert _keys(embeddings_out) <= _keys(documented_embedder["output_modalities"][0]) | {"capacity"}
    assert "streaming" not in embeddings_out and "max_length" not in embeddings_out


def test_legacy_keys_match_the_documented_example_key_for_key() -> None:
    (documented,) = fixture("openrouter_legacy_example.json")["data"]
    chat = by_id(build_listing(rich_node(), lambda _: True, None, created=5))["chat"]
    # Every key of the page's example, plus OpenAI's and vLLM's own beside them on `GET /v1/models`.
    assert _keys(chat) - (OPENAI_FIELDS - _keys(documented)) - VLLM_FIELDS == _keys(documented)
    assert _keys(chat["pricing"]) == _keys(documented["pricing"])
    assert _keys(chat["datacenters"][0]) == _keys(documented["datacenters"][0])
    assert _keys(chat["openrouter"]) == _keys(documented["openrouter"])
    page_order = [key for key in chat if key in documented]
    assert page_order == [key for key in documented if key in chat]


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
    # The legacy page's sampling parameters: no top_a (vLLM has none), no logprobs/top_logprobs (not on its list).
    assert chat["supported_sampling_parameters"] == ["temperature", "top_p", "top_k", "min_p", "frequency_penalty",
                                                     "presence_penalty", "repetition_penalty", "stop", "seed",
                                                     "max_tokens", "logit_bias"]
    assert (chat["description"], chat["deprecation_date"]) == ("A chat model.", "2027-01-31")
    assert (chat["is_free"], chat["discount_to_user"], chat["capacity_tpm"]) == (False, 0.1, 2_000_000)
    assert chat["openrouter"] == {"slug": "org/chat-8b"}
    assert chat["datacenters"] == [{"country_code": "US"}, {"country_code": "DE"}]
    assert not {"tokenizer", "deployment_region", "compliance"} & set(chat)  # current format only

    # Defaults: a display name from the id, no Hugging Face id is "", no tools without a tool parser.
    plain = entries["openai/gpt-oss-120b"]
    assert plain["name"] == "OpenAI: Gpt Oss 120B"
    assert plain["hugging_face_id"] == ""
    assert plain["quantization"] == "mxfp4"  # the legacy enum has the microscaling formats too
    assert plain["supported_features"] == ["json_mode", "structured_outputs", "logprobs"]
    assert plain["max_output_length"] == plain["context_length"] == 4096
    assert not {"is_free", "discount_to_user", "capacity_tpm", "description"} & set(plain)

    embedder = entries["embedder"]
    assert embedder["output_modalities"] == ["embeddings"]
    assert embedder["supported_sampling_parameters"] == [] and embedder["supported_features"] == []
    assert embedder["max_output_length"] is None
    assert entries["limited"]["supported_sampling_parameters"] == ["temperature", "stop"]
    assert entries["limited"]["supported_features"] == []


@pytest.mark.parametrize(("model_id", "name"), [
    ("meta-llama/Llama-3.1-8B-Instruct", "Meta: Llama 3.1 8B Instruct"),
    ("meta-llama/Llama-3.3-70B-Instruct", "Meta: Llama 3.3 70B Instruct"),
    ("anthropic/claude-sonnet-4", "Anthropic: Claude Sonnet 4"),
    ("Qwen/Qwen2.5-1.5B-Instruct", "Qwen: Qwen2.5 1.5B Instruct"),
    ("deepseek-ai/deepseek-r1-distill-llama-70b", "DeepSeek: Deepseek R1 Distill Llama 70B"),
    ("acme-labs/tiny_chat-560m", "Acme Labs: Tiny Chat 560M"),
    ("chat", "Chat"),
])
def test_display_name_follows_openrouters_author_model_convention(model_id: str, name: str) -> None:
    assert display_name(model_id) == name


@pytest.mark.parametrize(
    ("label", "engine_args", "value"),
    [
        ("bf16", {}, "bf16"),
        ("FP8", {}, "fp8"),
        ("mxfp4", {}, "mxfp4"),
        ("nvfp4", {}, "nvfp4"),
        ("mxfp8", {}, "mxfp8"),
        ("awq", {}, "int4"),
        ("gptq", {}, "int4"),
        ("w8a8", {}, "int8"),
        ("bfloat16", {}, "bf16"),
        (None, {"quantization": "fp8"}, "fp8"),  # vLLM's own --quantization
        (None, {"dtype": "float16"}, "fp16"),
        (None, {"dtype": "auto"}, None),
        (None, {}, None),
        ("q3_k_m", {}, None),
    ],
)
def test_quantization_is_in_the_enum_or_null_and_never_absent(label: str | None, engine_args: dict[str, str],
                                                               value: str | None) -> None:
    model: dict[str, Any] = {"id": "m", "source": "org/remote-weights", "pricing": PRICES, "engine_args": engine_args}
    if label is not None:
        model["quantization"] = label
    config = node(model)
    legacy_entry = build_listing(config, None)["data"][0]
    v24_entry = build_listing_v24(config, None)["data"][0]
    assert legacy_entry["quantization"] == v24_entry["quantization"] == value  # unknown: null, never guessed
    assert value is None or value in QUANTIZATIONS


@pytest.mark.parametrize(("checkpoint_config", "value"), [
    ({"torch_dtype": "bfloat16"}, "bf16"),
    ({"dtype": "float16"}, "fp16"),  # transformers >= 4.56 writes `dtype`
    ({"torch_dtype": "float32"}, "fp32"),
    ({"torch_dtype": "bfloat16", "quantization_config": {"quant_method": "fp8"}}, "fp8"),
    ({"quantization_config": {"quant_method": "awq", "bits": 4}}, "int4"),
    ({"quantization_config": {"quant_method": "gptq", "bits": 8}}, "int8"),
    ({"quantization_config": {"quant_method": "mxfp4"}}, "mxfp4"),
    ({"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}, "int4"),
    ({"quantization_config": {"quant_method": "modelopt", "quant_algo": "NVFP4"}}, "nvfp4"),
    ({"quantization_config": {"quant_method": "compressed-tensors", "format": "float-quantized",
                              "config_groups": {"group_0": {"weights": {"num_bits": 8, "type": "float"}}}}}, "fp8"),
    ({"quantization_config": {"quant_method": "compressed-tensors", "format": "pack-quantized",
                              "config_groups": {"a": {"weights": {"num_bits": 4, "type": "int"}},
                                                "b": {"weights": {"num_bits": 8, "type": "int"}}}}}, None),
    ({"quantization_config": {"quant_method": "gguf"}, "torch_dtype": "bfloat16"}, None),
    ({}, None),
])
def test_checkpoint_config_precision(checkpoint_config: dict[str, Any], value: str | None) -> None:
    assert checkpoint_quantization(checkpoint_config) == value


def test_quantization_from_a_local_checkpoint_else_null_with_a_start_up_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    local = tmp_path / "tiny-llama"
    local.mkdir()
    (local / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16", "vocab_size": 32000}))
    bare = tmp_path / "no-config"
    bare.mkdir()
    config = node({"id": "local", "source": str(local), "pricing": PRICES},
                  {"id": "declared", "source": str(local), "quantization": "fp8", "pricing": PRICES},
                  {"id": "bare", "source": str(bare), "pricing": PRICES},
                  {"id": "remote", "source": "org/remote", "pricing": PRICES})
    with caplog.at_level(logging.INFO, logger="worker.registry.listing"):
        catalog = ModelCatalog(config, readiness=None)
    legacy, v24 = by_id(catalog.listing()), by_id(catalog.listing_v24())
    assert {model_id: entry["quantization"] for model_id, entry in legacy.items()} == {
        "local": "bf16", "declared": "fp8", "bare": None, "remote": None}
    assert {model_id: entry["quantization"] for model_id, entry in v24.items()} == {
        "local": "bf16", "declared": "fp8", "bare": None, "remote": None}
    warned = {record.__dict__.get("model") for record in caplog.records if record.levelno == logging.WARNING}
    assert warned == {"bare", "remote"}
    # The checkpoint's vocabulary bounds top_k (at or above it vLLM samples from every token).
    top_k = v24["local"]["output_modalities"][0]["supported_parameters"]["top_k"]
    assert top_k == {"type": "integer", "min": 0, "max": 32000}
    assert v24["remote"]["output_modalities"][0]["supported_parameters"]["top_k"]["max"] == 2**31 - 1


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
    reported = {"chat": 2048, "openai/gpt-oss-120b": None}
    entries = by_id(build_listing(config, None, reported.get))
    assert entries["chat"]["context_length"] == entries["chat"]["max_model_len"] == 2048
    assert entries["chat"]["max_output_length"] == 2048  # clipped to what the engine can hold
    assert entries["openai/gpt-oss-120b"]["context_length"] == 4096  # nothing reported: models.yaml's value
    chat_v24 = by_id(build_listing_v24(config, None, reported.get))["chat"]
    limits = chat_v24["input_modalities"][0]["supported_inputs"]
    assert limits == {"max_context_length": {"value": 2048, "unit": "token"},
                      "max_prompt_length": {"value": 2047, "unit": "token"}}
    assert chat_v24["output_modalities"][0]["max_length"] == {"value": 2048, "unit": "token"}
    assert build_openai_listing(config, reported.get)["data"][0]["max_model_len"] == 2048


def test_v24_documents() -> None:
    listing = build_listing_v24(rich_node(), None, created=5)
    assert set(listing) == {"data"}  # schema_version is in each document, not on the list
    entries = by_id(listing)
    chat = entries["chat"]
    assert (chat["schema_version"], chat["created"], chat["quantization"]) == ("2.4", 5, "bf16")
    assert (chat["hugging_face_id"], chat["tokenizer"], chat["name"]) == ("org/Chat-8B", "Llama3", "Chat 8B")
    assert chat["datacenters"] == [{"country_code": "US", "region": "us-east"}, {"country_code": "DE"}]
    assert (chat["deployment_region"], chat["compliance"]) == ("US", {"zdr": True, "hipaa": False})
    assert (chat["is_free"], chat["discount_to_user"]) == (False, 0.1)
    # Request prices only at the root.
    assert chat["pricing"] == [{"type": "request", "unit": "request", "cost_usd": "0.001"}]
    text_in, image_in = chat["input_modalities"]
    assert text_in["pricing"] == [
        {"type": "prompt", "unit": "token", "cost_usd": "0.00000013"},
        {"type": "cached_prompt", "unit": "token", "cost_usd": "0.000000065"},
    ]
    assert text_in["capacity"] == [{"type": "prompt", "unit": "token", "per": "minute", "value": 2_000_000}]
    assert image_in == {"type": "image"}  # billed as the prompt tokens it becomes: no price of its own
    (text_out,) = chat["output_modalities"]
    assert text_out["streaming"] is True
    assert text_out["max_length"] == {"value": 4096, "unit": "token"}
    assert text_out["pricing"] == [{"type": "completion", "unit": "token", "cost_usd": "0.00000038"},
                                   {"type": "internal_reasoning", "unit": "token", "cost_usd": "0.00000038"}]
    assert text_out["capacity"] == [{"type": "concurrency", "unit": "request", "value": 128}]  # 2 x 64
    parameters = text_out["supported_parameters"]
    assert parameters["temperature"] == {"type": "range", "min": 0, "max": 2}
    assert parameters["stop"] == {"type": "array", "max_items": 4}
    assert parameters["max_tokens"] == {"type": "integer", "min": 1, "max": 4096, "unit": "token"}
    assert parameters["top_logprobs"] == {"type": "integer", "min": 0, "max": 5, "unit": "token"}
    assert parameters["top_k"] == {"type": "integer", "min": 0, "max": 2**31 - 1}
    assert parameters["seed"] == {"type": "integer", "min": -(2**63), "max": 2**63 - 1}
    for feature_parameter in ("tools", "tool_choice", "response_format", "structured_outputs", "reasoning"):
        assert parameters[feature_parameter] == {"type": "boolean"}
    assert "top_a" not in parameters  # missing key = unsupported

    # No request price, no cached price: nothing zero-stuffed, no root pricing at all.
    plain = entries["openai/gpt-oss-120b"]
    assert "pricing" not in plain and plain["name"] == "OpenAI: Gpt Oss 120B" and plain["hugging_face_id"] == ""
    assert plain["input_modalities"] == [{"type": "text", "supported_inputs": {
        "max_context_length": {"value": 4096, "unit": "token"}, "max_prompt_length": {"value": 4095, "unit": "token"}},
        "pricing": [{"type": "prompt", "unit": "token", "cost_usd": "0.00000013"}]}]
    assert "tokenizer" not in plain and "description" not in plain
    free = entries["free-model"]
    assert "pricing" not in free["input_modalities"][0] and "pricing" not in free["output_modalities"][0]

    limited = entries["limited"]["output_modalities"][0]["supported_parameters"]
    assert set(limited) == {"temperature", "stop", "top_logprobs"}
    embedder = entries["embedder"]
    assert embedder["quantization"] == "fp16"
    (embeddings_out,) = embedder["output_modalities"]
    assert embeddings_out == {"type": "embeddings", "supported_parameters": {},
                              "capacity": [{"type": "concurrency", "unit": "request", "value": 256}]}
    assert embedder["input_modalities"][0]["supported_inputs"] == {"max_context_length": {"value": 4096,
                                                                                          "unit": "token"}}
    assert embedder["input_modalities"][0]["pricing"] == [{"type": "prompt", "unit": "token", "cost_usd": "0.00000001"}]


async def test_openrouter_route_serves_v24() -> None:
    catalog = ModelCatalog(rich_node(), readiness=lambda model_id: model_id == "chat", created=7)
    app = FastAPI()
    app.include_router(build_listing_router(catalog))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://worker") as client:
        response = await client.get(OPENROUTER_V24_PATH)
    assert response.status_code == 200
    body = response.json()
    assert_valid(V24, body)
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
    assert_valid(LEGACY, legacy)
    assert all("is_ready" not in entry for entry in legacy["data"])  # no engines running: not claimed
    assert legacy["data"][1]["pricing"]["prompt"] == "0.00000013"
    assert [entry["name"] for entry in legacy["data"]] == ["Meta: Llama 3.1 8B Instruct",
                                                          "Meta: Llama 3.3 70B Instruct"]
    assert set(legacy["data"][0]["supported_sampling_parameters"]) <= set(LEGACY_SAMPLING_PARAMETERS)

    v24 = run_models_cli(capsys, "--format", "openrouter-v2.4")
    assert_valid(V24, v24)
    assert all("is_ready" not in entry for entry in v24["data"])

    openai = run_models_cli(capsys, "--format", "openai")
    assert [set(entry) for entry in openai["data"]] == [OPENAI_FIELDS | VLLM_FIELDS] * 2
    assert [entry["id"] for entry in openai["data"]] == [entry["id"] for entry in legacy["data"]]
