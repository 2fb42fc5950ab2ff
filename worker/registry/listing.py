"""`GET /v1/models` for routers: OpenAI's list with OpenRouter's provider fields, legacy flat or nested v2.4.

Pure functions of models.yaml plus two live readings passed in as callables: whether a model can take
requests now, and the context length its running engine reports.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from worker.config import ModelConfig, NodeConfig
from worker.registry.describe import ModelDescription, describe_model, legacy_quantization
from worker.registry.prices import per_token, token_prices, usd_text

Readiness = Callable[[str], bool]
ContextLengths = Callable[[str], int | None]

SCHEMA_VERSION = "2.4"
# Capacity states in which a replica takes requests (a saturated one answers 429 for a moment, then takes more).
_SERVING_STATES = frozenset({"ready", "saturated"})
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _describe_all(config: NodeConfig, context_lengths: ContextLengths | None) -> list[tuple[ModelConfig, ModelDescription]]:
    return [(model, describe_model(model, context_lengths(model.id) if context_lengths else None))
            for model in config.models]


def _openai_fields(model: ModelConfig, described: ModelDescription, config: NodeConfig, created: int) -> dict[str, Any]:
    # `root` and `max_model_len` are vLLM's additions to OpenAI's four fields; clients of vLLM read them.
    return {"id": model.id, "object": "model", "created": created, "owned_by": config.worker.id,
            "root": model.source, "max_model_len": described.context_length}


def build_openai_listing(config: NodeConfig, context_lengths: ContextLengths | None = None, *,
                         created: int | None = None) -> dict[str, Any]:
    """OpenAI's (and vLLM's) model list, without router fields."""
    created = int(time.time()) if created is None else created
    return {"object": "list", "data": [_openai_fields(model, described, config, created)
                                       for model, described in _describe_all(config, context_lengths)]}


def build_listing(config: NodeConfig, readiness: Readiness | None, context_lengths: ContextLengths | None = None,
                  *, created: int | None = None) -> dict[str, Any]:
    """OpenAI's list, each model with OpenRouter's legacy flat provider fields.

    `readiness` None (no running engines, e.g. `worker models`) leaves `is_ready` out.
    `context_lengths` returns the engine's own limit or None, which falls back to models.yaml.
    """
    created = int(time.time()) if created is None else created
    data = []
    for model, described in _describe_all(config, context_lengths):
        entry = _openai_fields(model, described, config, created)
        entry.update({
            "name": described.name,
            "hugging_face_id": described.hugging_face_id or "",
            "input_modalities": list(described.input_modalities),
            "output_modalities": list(described.output_modalities),
            "context_length": described.context_length,
            "max_output_length": described.max_output_length,
            "pricing": token_prices(model.pricing),
            "supported_sampling_parameters": list(described.sampling_parameters),
            "supported_features": list(described.features),
        })
        quantization = legacy_quantization(described.quantization)
        if quantization is not None:
            entry["quantization"] = quantization
        entry.update(_optional_fields(described))
        if config.worker.datacenters:
            entry["datacenters"] = [{"country_code": dc.country_code} for dc in config.worker.datacenters]
        if readiness is not None:
            entry["is_ready"] = bool(readiness(model.id))
        data.append(entry)
    return {"object": "list", "data": data}


def build_listing_v24(config: NodeConfig, readiness: Readiness | None, context_lengths: ContextLengths | None = None,
                      *, created: int | None = None) -> dict[str, Any]:
    """The same models in OpenRouter's nested provider schema, version 2.4."""
    created = int(time.time()) if created is None else created
    data = []
    for model, described in _describe_all(config, context_lengths):
        entry: dict[str, Any] = {
            "id": model.id,
            "name": described.name,
            "hugging_face_id": described.hugging_face_id,
            "created": created,
            "quantization": described.quantization,
            "input_modalities": _input_modalities(model, described),
            "output_modalities": _output_modalities(model, described),
        }
        entry.update(_optional_fields(described))
        if config.worker.datacenters:
            entry["datacenters"] = [dc.model_dump(exclude_none=True) for dc in config.worker.datacenters]
        if readiness is not None:
            entry["is_ready"] = bool(readiness(model.id))
        data.append(entry)
    return {"object": "list", "schema_version": SCHEMA_VERSION, "data": data}


def _optional_fields(described: ModelDescription) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if described.description:
        fields["description"] = described.description
    if described.deprecation_date is not None:
        fields["deprecation_date"] = described.deprecation_date.isoformat()
    if described.openrouter_slug:
        fields["openrouter"] = {"slug": described.openrouter_slug}
    return fields


def _price(kind: str, unit: str, cost_usd: str) -> dict[str, str]:
    return {"type": kind, "unit": unit, "cost_usd": cost_usd}


def _tokens(value: int) -> dict[str, Any]:
    return {"value": value, "unit": "token"}


def _input_modalities(model: ModelConfig, described: ModelDescription) -> list[dict[str, Any]]:
    pricing = model.pricing
    entries: list[dict[str, Any]] = []
    for modality in described.input_modalities:
        if modality != "text":
            # Images, files and audio reach the model as prompt tokens and are billed as such.
            entries.append({"type": modality, "pricing": [], "capacity": []})
            continue
        prices = [_price("prompt", "token", per_token(pricing.prompt_per_mtok))]
        if pricing.cached_prompt_per_mtok is not None:
            prices.append(_price("cached_prompt", "token", per_token(pricing.cached_prompt_per_mtok)))
        prices.append(_price("request", "request", usd_text(pricing.request)))
        entries.append({"type": "text", "max_context_length": _tokens(described.context_length),
                        "max_prompt_length": _tokens(described.max_prompt_length),
                        "pricing": prices, "capacity": []})
    return entries


def _output_modalities(model: ModelConfig, described: ModelDescription) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    for index, modality in enumerate(described.output_modalities):
        if index > 0:
            entries.append({"type": modality, "pricing": [], "capacity": []})
            continue
        # The first output modality carries the model's generation parameters, price and concurrency.
        entry: dict[str, Any] = {"type": modality}
        prices: list[dict[str, str]] = []
        if described.max_output_length is not None:
            entry["max_output_length"] = _tokens(described.max_output_length)
            completion = per_token(model.pricing.completion_per_mtok)
            prices.append(_price("completion", "token", completion))
            if "reasoning" in described.features:
                # vLLM counts reasoning tokens as completion tokens; they cost the same.
                prices.append(_price("internal_reasoning", "token", completion))
        entry["streaming"] = described.streaming
        entry["supported_parameters"] = supported_parameters(model, described)
        entry["pricing"] = prices
        entry["capacity"] = [{"type": "concurrency", "unit": "request", "value": described.concurrency}]
        entries.append(entry)
    return entries


def supported_parameters(model: ModelConfig, described: ModelDescription) -> dict[str, dict[str, Any]]:
    """v2.4 descriptors; a parameter absent from the map is unsupported. Bounds are vLLM's (OpenAI's)."""
    max_logprobs = int(model.engine_args.get("max_logprobs", 20))
    descriptors: dict[str, dict[str, Any]] = {
        "temperature": {"type": "range", "min": 0, "max": 2},
        "top_p": {"type": "range", "min": 0, "max": 1},
        "top_k": {"type": "range", "min": 0},  # no upper bound; 0 turns it off
        "min_p": {"type": "range", "min": 0, "max": 1},
        "top_a": {"type": "range", "min": 0, "max": 1},
        "frequency_penalty": {"type": "range", "min": -2, "max": 2},
        "presence_penalty": {"type": "range", "min": -2, "max": 2},
        "repetition_penalty": {"type": "range", "min": 0, "max": 2},
        "stop": {"type": "array", "max_items": 4},
        "seed": {"type": "range", "min": _INT64_MIN, "max": _INT64_MAX},
        "max_tokens": {"type": "range", "min": 1, "max": described.max_output_length or 1},
        "logit_bias": {"type": "boolean"},
        "logprobs": {"type": "boolean"},
        "top_logprobs": {"type": "range", "min": 0, "max": max_logprobs},
    }
    result = {name: descriptors[name] for name in described.sampling_parameters}
    feature_parameters = {
        "tools": ("tools", "tool_choice"),
        "json_mode": ("response_format",),
        "structured_outputs": ("structured_outputs",),
        "logprobs": ("logprobs",),
        "reasoning": ("reasoning", "include_reasoning"),
        "web_search": ("web_search_options",),
    }
    for feature in described.features:
        for name in feature_parameters[feature]:
            result.setdefault(name, {"type": "boolean"})
    return result


def readiness_by_model(readiness: Callable[[], tuple[bool, Mapping[str, Any]]]) -> Readiness:
    """Per-model readiness from the node's `readiness()`: (ok, {"draining": bool, "models": {id: [states]}}).

    A model is ready while the node is not draining and one of its replicas takes requests.
    """
    def model_ready(model_id: str) -> bool:
        _, detail = readiness()
        if detail.get("draining"):
            return False
        states = detail.get("models", {}).get(model_id, ())
        return any(str(state) in _SERVING_STATES for state in states)

    return model_ready


class ModelCatalog:
    """The node's models as every listing shows them, with the live readings bound once."""

    def __init__(self, config: NodeConfig, *, readiness: Readiness | None,
                 context_lengths: ContextLengths | None = None, created: int | None = None) -> None:
        self.config = config
        self.readiness = readiness
        self.context_lengths = context_lengths
        self.created = int(time.time()) if created is None else created

    def listing(self) -> dict[str, Any]:
        return build_listing(self.config, self.readiness, self.context_lengths, created=self.created)

    def listing_v24(self) -> dict[str, Any]:
        return build_listing_v24(self.config, self.readiness, self.context_lengths, created=self.created)

    def openai_listing(self) -> dict[str, Any]:
        return build_openai_listing(self.config, self.context_lengths, created=self.created)
