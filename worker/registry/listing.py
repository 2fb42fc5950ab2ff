"""`GET /v1/models` for routers: OpenAI's list with OpenRouter's provider fields, legacy flat or current (v2.4).

Both follow OpenRouter's "Provider Integration" page: the current format's document per model
(`schema_version` in each entry, modalities that own their limits, prices and capacity) and the legacy
flat format. Pure functions of models.yaml, what the local checkpoints say (read once), and two live
readings passed in as callables: whether a model can take requests now, and the context length its
running engine reports.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any

from worker.config import ModelConfig, NodeConfig
from worker.registry.checkpoint import CheckpointFacts, checkpoint_facts
from worker.registry.describe import ModelDescription, describe_model
from worker.registry.prices import per_token, token_prices, usd_text

logger = logging.getLogger(__name__)

Readiness = Callable[[str], bool]
ContextLengths = Callable[[str], int | None]
Checkpoints = Mapping[str, CheckpointFacts]

SCHEMA_VERSION = "2.4"
# The sampling parameters the legacy format accepts; logprobs is one of its features instead.
LEGACY_SAMPLING_PARAMETERS = frozenset({
    "temperature", "top_p", "top_k", "min_p", "top_a", "frequency_penalty", "presence_penalty",
    "repetition_penalty", "stop", "seed", "max_tokens", "logit_bias",
})
# Capacity states in which a replica takes requests (a saturated one answers 429 for a moment, then takes more).
_SERVING_STATES = frozenset({"ready", "saturated"})
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
# vLLM keeps top_k as a 32-bit integer and treats any value at or above the vocabulary size as "off".
_INT32_MAX = 2**31 - 1


def _describe_all(config: NodeConfig, context_lengths: ContextLengths | None,
                  checkpoints: Checkpoints | None) -> list[tuple[ModelConfig, ModelDescription]]:
    return [(model, describe_model(model, context_lengths(model.id) if context_lengths else None,
                                   checkpoint=checkpoints.get(model.id) if checkpoints is not None else None))
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
                                       for model, described in _describe_all(config, context_lengths, None)]}


def build_listing(config: NodeConfig, readiness: Readiness | None, context_lengths: ContextLengths | None = None,
                  *, created: int | None = None, checkpoints: Checkpoints | None = None) -> dict[str, Any]:
    """OpenAI's list, each model with OpenRouter's legacy flat provider fields, in the page's order.

    `readiness` None (no running engines, e.g. `worker models`) leaves `is_ready` out.
    `context_lengths` returns the engine's own limit or None, which falls back to models.yaml.
    `checkpoints` None reads the local checkpoints now (ModelCatalog reads them once).
    """
    created = int(time.time()) if created is None else created
    checkpoints = read_checkpoints(config) if checkpoints is None else checkpoints
    data = []
    for model, described in _describe_all(config, context_lengths, checkpoints):
        openai = _openai_fields(model, described, config, created)
        entry: dict[str, Any] = {
            "id": model.id,
            "hugging_face_id": described.hugging_face_id or "",
            "name": described.name,
            "created": created,
            "input_modalities": list(described.input_modalities),
            "output_modalities": list(described.output_modalities),
            "quantization": described.quantization,  # null: undeclared (logged at start-up)
            "context_length": described.context_length,
            "max_output_length": described.max_output_length,
            "pricing": token_prices(model.pricing),
            "supported_sampling_parameters": [name for name in described.sampling_parameters
                                              if name in LEGACY_SAMPLING_PARAMETERS],
            "supported_features": list(described.features),
        }
        entry.update({key: openai[key] for key in ("object", "owned_by", "root", "max_model_len")})
        if described.description:
            entry["description"] = described.description
        if described.deprecation_date is not None:
            entry["deprecation_date"] = described.deprecation_date.isoformat()
        entry.update(_operational_fields(described, readiness))
        if described.capacity_tpm is not None:
            entry["capacity_tpm"] = described.capacity_tpm
        if described.openrouter_slug:
            entry["openrouter"] = {"slug": described.openrouter_slug}
        if config.worker.datacenters:
            entry["datacenters"] = [{"country_code": dc.country_code} for dc in config.worker.datacenters]
        data.append(entry)
    return {"object": "list", "data": data}


def build_listing_v24(config: NodeConfig, readiness: Readiness | None, context_lengths: ContextLengths | None = None,
                      *, created: int | None = None, checkpoints: Checkpoints | None = None) -> dict[str, Any]:
    """The same models as OpenRouter's current model documents (schema 2.4), in the page's order."""
    created = int(time.time()) if created is None else created
    checkpoints = read_checkpoints(config) if checkpoints is None else checkpoints
    data = []
    for model, described in _describe_all(config, context_lengths, checkpoints):
        entry: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "id": model.id,
            "name": described.name,
            "hugging_face_id": described.hugging_face_id or "",
            "created": created,
            "quantization": described.quantization,
        }
        if described.tokenizer:
            entry["tokenizer"] = described.tokenizer
        if described.description:
            entry["description"] = described.description
        entry["input_modalities"] = _input_modalities(model, described)
        entry["output_modalities"] = _output_modalities(model, described)
        # Only request-scoped prices sit at the root; a zero price is left out, never listed as "0".
        if model.pricing.request > 0:
            entry["pricing"] = [_price("request", "request", model.pricing.request)]
        if described.deprecation_date is not None:
            entry["deprecation_date"] = described.deprecation_date.isoformat()
        entry.update(_operational_fields(described, readiness))
        if described.openrouter_slug:
            entry["openrouter"] = {"slug": described.openrouter_slug}
        if config.worker.datacenters:
            entry["datacenters"] = [dc.model_dump(exclude_none=True) for dc in config.worker.datacenters]
        if described.deployment_region:
            entry["deployment_region"] = described.deployment_region
        if described.compliance:
            entry["compliance"] = dict(described.compliance)
        data.append(entry)
    return {"data": data}


def _operational_fields(described: ModelDescription, readiness: Readiness | None) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if readiness is not None:
        fields["is_ready"] = bool(readiness(described.id))
    if described.is_free is not None:
        fields["is_free"] = described.is_free
    if described.discount_to_user is not None:
        fields["discount_to_user"] = described.discount_to_user
    return fields


def _price(kind: str, unit: str, usd: Decimal | str) -> dict[str, str]:
    return {"type": kind, "unit": unit, "cost_usd": usd if isinstance(usd, str) else usd_text(usd)}


def _limit(value: int) -> dict[str, Any]:
    return {"value": value, "unit": "token"}


def _input_modalities(model: ModelConfig, described: ModelDescription) -> list[dict[str, Any]]:
    pricing = model.pricing
    entries: list[dict[str, Any]] = []
    for modality in described.input_modalities:
        if modality != "text":
            # Images, files and audio reach the model as prompt tokens and are billed as such.
            entries.append({"type": modality})
            continue
        limits = {"max_context_length": _limit(described.context_length)}
        if described.max_prompt_length != described.context_length:
            limits["max_prompt_length"] = _limit(described.max_prompt_length)
        text: dict[str, Any] = {"type": "text", "supported_inputs": limits}
        prices = []
        if pricing.prompt_per_mtok > 0:
            prices.append(_price("prompt", "token", per_token(pricing.prompt_per_mtok)))
            # A free cache read beside a paid prompt is a distinct line, so "0" is listed.
            if pricing.cached_prompt_per_mtok is not None:
                prices.append(_price("cached_prompt", "token", per_token(pricing.cached_prompt_per_mtok)))
        if prices:
            text["pricing"] = prices
        if described.capacity_tpm is not None:
            text["capacity"] = [{"type": "prompt", "unit": "token", "per": "minute", "value": described.capacity_tpm}]
        entries.append(text)
    return entries


def _output_modalities(model: ModelConfig, described: ModelDescription) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    for index, modality in enumerate(described.output_modalities):
        if index > 0:
            entries.append({"type": modality, "supported_parameters": {}})
            continue
        # The first output modality carries the model's generation parameters, price and concurrency.
        entry: dict[str, Any] = {"type": modality}
        if described.max_output_length is not None and modality == "text":
            entry["max_length"] = _limit(described.max_output_length)
        if modality != "embeddings":  # streaming does not apply to embeddings
            entry["streaming"] = described.streaming
        entry["supported_parameters"] = supported_parameters(model, described)
        prices: list[dict[str, str]] = []
        if described.max_output_length is not None and model.pricing.completion_per_mtok > 0:
            completion = per_token(model.pricing.completion_per_mtok)
            prices.append(_price("completion", "token", completion))
            if "reasoning" in described.features:
                # vLLM counts reasoning tokens as completion tokens; they cost the same.
                prices.append(_price("internal_reasoning", "token", completion))
        if prices:
            entry["pricing"] = prices
        entry["capacity"] = [{"type": "concurrency", "unit": "request", "value": described.concurrency}]
        entries.append(entry)
    return entries


def supported_parameters(model: ModelConfig, described: ModelDescription) -> dict[str, dict[str, Any]]:
    """v2.4 descriptors; a parameter absent from the map is unsupported. Bounds are vLLM's (OpenAI's)."""
    max_logprobs = int(model.engine_args.get("max_logprobs", 20))
    max_tokens = described.max_output_length or 1
    descriptors: dict[str, dict[str, Any]] = {
        "temperature": {"type": "range", "min": 0, "max": 2},
        "top_p": {"type": "range", "min": 0, "max": 1},
        # 0 turns it off; so does any value at or above the vocabulary size.
        "top_k": {"type": "integer", "min": 0, "max": described.vocab_size or _INT32_MAX},
        "min_p": {"type": "range", "min": 0, "max": 1},
        "top_a": {"type": "range", "min": 0, "max": 1},
        "frequency_penalty": {"type": "range", "min": -2, "max": 2},
        "presence_penalty": {"type": "range", "min": -2, "max": 2},
        "repetition_penalty": {"type": "range", "min": 0, "max": 2},
        "stop": {"type": "array", "max_items": 4},
        "seed": {"type": "integer", "min": _INT64_MIN, "max": _INT64_MAX},
        "max_tokens": {"type": "integer", "min": 1, "max": max_tokens, "unit": "token"},
        "logit_bias": {"type": "boolean"},
        "logprobs": {"type": "boolean"},
        "top_logprobs": {"type": "integer", "min": 0, "max": max_logprobs, "unit": "token"},
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


def read_checkpoints(config: NodeConfig) -> dict[str, CheckpointFacts]:
    """What each model's local checkpoint adds to models.yaml (reads config.json files: call once)."""
    return {model.id: checkpoint_facts(model) for model in config.models}


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
    """The node's models as every listing shows them, with the live readings bound once.

    Local checkpoints are read here, once; a model whose precision nobody declares is logged, since
    routers are then told `quantization: null`.
    """

    def __init__(self, config: NodeConfig, *, readiness: Readiness | None,
                 context_lengths: ContextLengths | None = None, created: int | None = None) -> None:
        self.config = config
        self.readiness = readiness
        self.context_lengths = context_lengths
        self.created = int(time.time()) if created is None else created
        self.checkpoints = read_checkpoints(config)
        for model_id, facts in self.checkpoints.items():
            if facts.quantization is None:
                logger.warning("no quantization declared: routers are told quantization null; set `quantization` "
                               "in models.yaml", extra={"model": model_id})
            elif facts.quantization_source == "checkpoint":
                logger.info("quantization read from the checkpoint's config.json",
                            extra={"model": model_id, "quantization": facts.quantization})

    def listing(self) -> dict[str, Any]:
        return build_listing(self.config, self.readiness, self.context_lengths, created=self.created,
                             checkpoints=self.checkpoints)

    def listing_v24(self) -> dict[str, Any]:
        return build_listing_v24(self.config, self.readiness, self.context_lengths, created=self.created,
                                 checkpoints=self.checkpoints)

    def openai_listing(self) -> dict[str, Any]:
        return build_openai_listing(self.config, self.context_lengths, created=self.created)
