"""The router's model-listing contract written out as JSON schemas: the field lists, enums and price format."""

from __future__ import annotations

from typing import Any

# USD per token / request as a plain decimal string: no exponent, no sign, no trailing zeros.
PRICE_PATTERN = r"^(0|[1-9][0-9]*)(\.[0-9]*[1-9])?$"
LEGACY_QUANTIZATIONS = ["int4", "int8", "fp4", "fp6", "fp8", "fp16", "bf16", "fp32"]
V24_QUANTIZATIONS = [*LEGACY_QUANTIZATIONS, "mxfp4", "nvfp4", "mxfp8"]
SAMPLING_PARAMETERS = ["temperature", "top_p", "top_k", "min_p", "top_a", "frequency_penalty", "presence_penalty",
                       "repetition_penalty", "stop", "seed", "max_tokens", "logit_bias", "logprobs", "top_logprobs"]
FEATURES = ["tools", "json_mode", "structured_outputs", "logprobs", "web_search", "reasoning"]
INPUT_MODALITIES = ["text", "image", "file", "audio", "video"]
OUTPUT_MODALITIES = ["text", "image", "audio", "embeddings"]
V24_PRICE_TYPES = ["prompt", "cached_prompt", "cache_write", "completion", "internal_reasoning", "request"]

OPENAI_FIELDS = {"id", "object", "created", "owned_by"}
VLLM_FIELDS = {"root", "max_model_len"}
LEGACY_REQUIRED = {"name", "hugging_face_id", "input_modalities", "output_modalities", "context_length",
                   "max_output_length", "pricing", "supported_sampling_parameters", "supported_features"}
LEGACY_OPTIONAL = {"quantization", "description", "deprecation_date", "openrouter", "datacenters", "is_ready"}

_STRING = {"type": "string"}
_PRICE = {"type": "string", "pattern": PRICE_PATTERN}
_SLUG = {"type": "object", "required": ["slug"], "additionalProperties": False, "properties": {"slug": _STRING}}
_DATE = {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$"}


def _unique_enum_array(values: list[str]) -> dict[str, Any]:
    return {"type": "array", "items": {"enum": values}, "uniqueItems": True}


LEGACY_MODEL: dict[str, Any] = {
    "type": "object",
    "required": sorted(OPENAI_FIELDS | LEGACY_REQUIRED),
    "additionalProperties": False,
    "properties": {
        "id": _STRING, "object": {"const": "model"}, "created": {"type": "integer"}, "owned_by": _STRING,
        "root": _STRING, "max_model_len": {"type": "integer", "minimum": 1},
        "name": {"type": "string", "minLength": 1}, "hugging_face_id": _STRING,
        "input_modalities": {**_unique_enum_array(INPUT_MODALITIES), "minItems": 1},
        "output_modalities": {**_unique_enum_array(OUTPUT_MODALITIES), "minItems": 1},
        "quantization": {"enum": LEGACY_QUANTIZATIONS},
        "context_length": {"type": "integer", "minimum": 1},
        "max_output_length": {"type": ["integer", "null"], "minimum": 1},
        "pricing": {
            "type": "object",
            "required": ["prompt", "completion", "image", "request"],
            "additionalProperties": False,
            "properties": {key: _PRICE for key in ("prompt", "completion", "input_cache_read", "input_cache_write",
                                                    "image", "request")},
        },
        "supported_sampling_parameters": _unique_enum_array(SAMPLING_PARAMETERS),
        "supported_features": _unique_enum_array(FEATURES),
        "description": _STRING, "deprecation_date": _DATE, "openrouter": _SLUG,
        "datacenters": {"type": "array", "items": {
            "type": "object", "required": ["country_code"], "additionalProperties": False,
            "properties": {"country_code": {"type": "string", "pattern": "^[A-Z]{2}$"}}}},
        "is_ready": {"type": "boolean"},
    },
}

LEGACY_LISTING: dict[str, Any] = {
    "type": "object", "required": ["object", "data"], "additionalProperties": False,
    "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": LEGACY_MODEL}},
}

_TOKENS = {"type": "object", "required": ["value", "unit"], "additionalProperties": False,
           "properties": {"value": {"type": "integer", "minimum": 1}, "unit": {"const": "token"}}}
_V24_PRICE = {"type": "object", "required": ["type", "unit", "cost_usd"], "additionalProperties": False,
              "properties": {"type": {"enum": V24_PRICE_TYPES}, "unit": {"enum": ["token", "request"]},
                             "cost_usd": _PRICE}}
_CAPACITY = {
    "type": "object", "required": ["type", "unit", "value"], "additionalProperties": False,
    "properties": {"type": _STRING, "unit": _STRING, "per": {"enum": ["minute", "hour", "day"]},
                   "value": {"type": "integer", "minimum": 1}},
}
_DESCRIPTOR = {
    "oneOf": [
        {"type": "object", "required": ["type", "min"], "additionalProperties": False,
         "properties": {"type": {"const": "range"}, "min": {"type": "number"}, "max": {"type": "number"}}},
        {"type": "object", "required": ["type"], "additionalProperties": False,
         "properties": {"type": {"const": "array"}, "max_items": {"type": "integer", "minimum": 1}}},
        {"type": "object", "required": ["type"], "additionalProperties": False,
         "properties": {"type": {"const": "boolean"}}},
    ]
}
_INPUT_MODALITY = {
    "type": "object", "required": ["type", "pricing", "capacity"], "additionalProperties": False,
    "properties": {"type": {"enum": INPUT_MODALITIES}, "max_context_length": _TOKENS, "max_prompt_length": _TOKENS,
                   "pricing": {"type": "array", "items": _V24_PRICE}, "capacity": {"type": "array", "items": _CAPACITY}},
}
_OUTPUT_MODALITY = {
    "type": "object", "required": ["type", "pricing", "capacity"], "additionalProperties": False,
    "properties": {"type": {"enum": OUTPUT_MODALITIES}, "max_output_length": _TOKENS, "streaming": {"type": "boolean"},
                   "supported_parameters": {"type": "object", "additionalProperties": _DESCRIPTOR},
                   "pricing": {"type": "array", "items": _V24_PRICE}, "capacity": {"type": "array", "items": _CAPACITY}},
}
V24_MODEL: dict[str, Any] = {
    "type": "object",
    "required": ["id", "name", "hugging_face_id", "created", "quantization", "input_modalities", "output_modalities"],
    "additionalProperties": False,
    "properties": {
        "id": _STRING, "name": {"type": "string", "minLength": 1}, "hugging_face_id": {"type": ["string", "null"]},
        "created": {"type": "integer"}, "quantization": {"enum": [*V24_QUANTIZATIONS, None]},
        "description": _STRING,
        "input_modalities": {"type": "array", "minItems": 1, "items": _INPUT_MODALITY},
        "output_modalities": {"type": "array", "minItems": 1, "items": _OUTPUT_MODALITY},
        "datacenters": {"type": "array", "items": {
            "type": "object", "required": ["country_code"], "additionalProperties": False,
            "properties": {"country_code": {"type": "string", "pattern": "^[A-Z]{2}$"}, "region": _STRING}}},
        "is_ready": {"type": "boolean"}, "deprecation_date": _DATE, "openrouter": _SLUG,
    },
}
V24_LISTING: dict[str, Any] = {
    "type": "object", "required": ["schema_version", "data"], "additionalProperties": False,
    "properties": {"object": {"const": "list"}, "schema_version": {"const": "2.4"},
                   "data": {"type": "array", "items": V24_MODEL}},
}
