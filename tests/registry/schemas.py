"""OpenRouter's provider model documents written out as JSON Schemas, from its "Provider Integration" pages.

Two formats (see fixtures/SOURCE.md for the pages and the date they were read):
- current (schema 2.4): one document per model in `data[]`, typed input and output modalities that own
  their limits, prices and capacity; only request-scoped prices and capacity at the document root;
- legacy flat: the older per-model fields, as `GET /v1/models` serves them beside OpenAI's.

Every object is closed (`additionalProperties: false`), as the published schema is: a key the page does
not define fails validation instead of being ignored.
"""

from __future__ import annotations

from typing import Any

from jsonschema import Draft202012Validator
from referencing import Registry
from referencing.jsonschema import DRAFT202012

# The page's rule for `cost_usd` and the legacy prices: a non-negative decimal string, never a float.
DOCUMENTED_PRICE = r"^\d+(\.\d+)?$"
# What the worker writes: the same, with no leading or trailing zeros ("0.00000013", "2", "0").
PRICE_PATTERN = r"^(0|[1-9][0-9]*)(\.[0-9]*[1-9])?$"
QUANTIZATIONS = ["int4", "int8", "fp4", "mxfp4", "nvfp4", "fp6", "fp8", "mxfp8", "fp16", "bf16", "fp32"]
# Legacy page: "Valid sampling parameters" and "Valid features".
LEGACY_SAMPLING_PARAMETERS = ["temperature", "top_p", "top_k", "min_p", "top_a", "frequency_penalty",
                              "presence_penalty", "repetition_penalty", "stop", "seed", "max_tokens", "logit_bias"]
FEATURES = ["tools", "json_mode", "structured_outputs", "logprobs", "web_search", "reasoning"]
INPUT_MODALITIES = ["text", "image", "file", "audio", "video"]
OUTPUT_MODALITIES = ["text", "image", "embeddings", "audio", "video", "rerank", "speech", "transcription"]

OPENAI_FIELDS = {"id", "object", "created", "owned_by"}
VLLM_FIELDS = {"root", "max_model_len"}
# The legacy page's example, "// Required" and "// Optional".
LEGACY_REQUIRED = {"id", "hugging_face_id", "name", "created", "input_modalities", "output_modalities", "quantization",
                   "context_length", "max_output_length", "pricing", "supported_sampling_parameters",
                   "supported_features"}
LEGACY_OPTIONAL = {"description", "deprecation_date", "is_ready", "is_free", "discount_to_user", "capacity_tpm",
                   "openrouter", "datacenters"}

_STRING = {"type": "string"}
_NONEMPTY = {"type": "string", "minLength": 1}
_BOOLEAN = {"type": "boolean"}
_SLUG = {"type": "object", "required": ["slug"], "additionalProperties": False, "properties": {"slug": _STRING}}
# "ISO 8601 date or UTC hour": YYYY-MM-DD, or YYYY-MM-DDTHH:00:00Z.
_DEPRECATION = {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}(T\d{2}:00:00Z)?$"}
_COUNTRY = {"type": "string", "pattern": "^[A-Z]{2}$"}
# "A value of 1 or higher ... isn't a valid discount"; sent as a number, not a string.
_DISCOUNT = {"type": "number", "exclusiveMaximum": 1}


def _closed(required: list[str], properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": required, "additionalProperties": False, "properties": properties}


def _unique_enum_array(values: list[str]) -> dict[str, Any]:
    return {"type": "array", "items": {"enum": values}, "uniqueItems": True}


# ---------------------------------------------------------------------------------------------- legacy
_LEGACY_PRICES = ("prompt", "completion", "input_cache_read", "input_cache_write", "image", "request")
LEGACY_MODEL: dict[str, Any] = _closed(sorted(LEGACY_REQUIRED), {
    "id": _NONEMPTY, "hugging_face_id": _STRING, "name": _NONEMPTY, "created": {"type": "integer"},
    "input_modalities": {**_unique_enum_array(INPUT_MODALITIES), "minItems": 1},
    "output_modalities": {**_unique_enum_array(OUTPUT_MODALITIES), "minItems": 1},
    # null: the precision is undeclared (the current page's rule; the worker logs it at start-up).
    "quantization": {"enum": [*QUANTIZATIONS, None]},
    "context_length": {"type": "integer", "minimum": 1},
    "max_output_length": {"type": ["integer", "null"], "minimum": 1},  # null: embedding models produce no tokens
    "pricing": {"type": "object", "additionalProperties": False, "required": ["prompt", "completion"],
                "properties": {**{key: {"type": "string", "pattern": DOCUMENTED_PRICE} for key in _LEGACY_PRICES},
                               "overrides": {"type": "array", "maxItems": 2}}},
    "supported_sampling_parameters": _unique_enum_array(LEGACY_SAMPLING_PARAMETERS),
    "supported_features": _unique_enum_array(FEATURES),
    "description": _STRING, "deprecation_date": _DEPRECATION, "is_ready": _BOOLEAN, "is_free": _BOOLEAN,
    "discount_to_user": _DISCOUNT, "capacity_tpm": {"type": ["integer", "null"], "minimum": 1},
    "openrouter": _SLUG,
    "datacenters": {"type": "array", "items": _closed(["country_code"], {"country_code": _COUNTRY})},
})
# `GET /v1/models` also carries OpenAI's and vLLM's fields beside the legacy ones.
LEGACY_MODEL_WITH_OPENAI: dict[str, Any] = {**LEGACY_MODEL, "properties": {
    **LEGACY_MODEL["properties"], "object": {"const": "model"}, "owned_by": _STRING, "root": _STRING,
    "max_model_len": {"type": "integer", "minimum": 1}}}
LEGACY_LISTING: dict[str, Any] = _closed(["data"], {
    "object": {"const": "list"}, "data": {"type": "array", "items": LEGACY_MODEL_WITH_OPENAI}})
LEGACY_EXAMPLE: dict[str, Any] = _closed(["data"], {"data": {"type": "array", "items": LEGACY_MODEL}})

# ---------------------------------------------------------------------------------------------- schema 2.4
_UNITS = ["second", "pixel", "byte", "token", "character"]
_LIMIT = _closed(["value"], {"value": {"type": "integer", "minimum": 1}, "unit": {"enum": _UNITS}})
_NUMBER_LIMIT = _closed(["value"], {"value": {"type": "number", "exclusiveMinimum": 0}, "unit": {"enum": _UNITS}})

_DESCRIPTOR_TYPES = ["range", "integer", "boolean", "enum", "array", "object", "unknown"]
_DESCRIPTOR_KEYS = {"type", "min", "max", "default", "values", "unit", "max_items", "items", "properties"}
# Keys each descriptor type may carry besides `type` and `default` (the page's "Capability descriptors").
_DESCRIPTOR_SHAPES = {
    "range": {"min", "max", "unit"}, "integer": {"min", "max", "unit"}, "boolean": set(),
    "enum": {"values"}, "array": {"items", "max_items"}, "object": {"properties"}, "unknown": set(),
}
DESCRIPTOR: dict[str, Any] = {
    "$id": "descriptor",
    "type": "object", "required": ["type"], "additionalProperties": False,
    "properties": {
        "type": {"enum": _DESCRIPTOR_TYPES}, "min": {"type": "number"}, "max": {"type": "number"},
        "default": {"type": ["string", "number", "boolean"]},
        "values": {"type": "array", "items": {"type": ["string", "number"]}},
        "unit": {"enum": _UNITS}, "max_items": {"type": "integer", "minimum": 1},
        "items": {"$ref": "descriptor"},
        "properties": {"type": "object", "additionalProperties": {"$ref": "descriptor"}},
    },
    "allOf": [
        {"if": {"properties": {"type": {"const": kind}}},
         "then": {"properties": dict.fromkeys(sorted(_DESCRIPTOR_KEYS - allowed - {"type", "default"}), False)}}
        for kind, allowed in _DESCRIPTOR_SHAPES.items()
    ] + [
        {"if": {"properties": {"type": {"const": "integer"}}},
         "then": {"properties": {"min": {"type": "integer"}, "max": {"type": "integer"}}}},
        {"if": {"properties": {"type": {"const": "enum"}}}, "then": {"required": ["values"]}},
        {"if": {"properties": {"type": {"const": "object"}}}, "then": {"required": ["properties"]}},
    ],
}
_DESCRIPTORS = {"type": "object", "additionalProperties": {"$ref": "descriptor"}}

_INPUT_UNITS = ["token", "image", "megapixel", "second", "character"]
_PRICE_QUALIFIERS = {"overrides": {"type": "array"},
                     "utc_start": {"type": "integer", "minimum": 0, "maximum": 2359},
                     "utc_end": {"type": "integer", "minimum": 0, "maximum": 2359}}
_COST = {"type": "string", "pattern": DOCUMENTED_PRICE}
_INPUT_PRICE = _closed(["type", "unit", "cost_usd"], {
    "type": {"enum": ["prompt", "cached_prompt", "cache_write"]}, "unit": {"enum": _INPUT_UNITS}, "cost_usd": _COST,
    "ttl_seconds": {"type": "integer", "minimum": 1}, "implicit": _BOOLEAN, **_PRICE_QUALIFIERS})
_OUTPUT_PRICE = _closed(["type", "unit", "cost_usd"], {
    "type": {"enum": ["completion", "internal_reasoning"]}, "unit": {"enum": [*_INPUT_UNITS, "request"]},
    "cost_usd": _COST, **_PRICE_QUALIFIERS})
# "Root request entries are always per request and web_search entries per search."
_REQUEST_PRICE = {"oneOf": [
    _closed(["type", "unit", "cost_usd"], {"type": {"const": "request"}, "unit": {"const": "request"},
                                           "cost_usd": _COST, "overrides": {"type": "array"}}),
    _closed(["type", "unit", "cost_usd"], {"type": {"const": "web_search"}, "unit": {"const": "search"},
                                           "cost_usd": _COST, "overrides": {"type": "array"}}),
]}
_WINDOW = {"enum": ["minute", "hour", "day"]}
_POSITIVE = {"type": "integer", "minimum": 1}
_CONCURRENCY = _closed(["type", "unit", "value"], {"type": {"const": "concurrency"}, "unit": {"const": "request"},
                                                  "value": _POSITIVE})


def _capacity(types: list[str], units: list[str], *, concurrency: bool) -> dict[str, Any]:
    windowed = _closed(["type", "unit", "per", "value"], {"type": {"enum": types}, "unit": {"enum": units},
                                                          "per": _WINDOW, "value": _POSITIVE})
    return {"type": "array", "items": {"oneOf": [windowed, _CONCURRENCY]} if concurrency else windowed}


_INPUT_CAPACITY = _capacity(["prompt", "cached_prompt", "cache_write"], _INPUT_UNITS, concurrency=False)
_OUTPUT_CAPACITY = _capacity(["completion", "internal_reasoning"], [*_INPUT_UNITS, "request"], concurrency=True)
_ROOT_CAPACITY = _capacity(["request", "web_search"], ["request", "search"], concurrency=True)


def _media(formats: list[str] | None = None) -> dict[str, Any]:
    values: dict[str, Any] = {"type": "array", "items": {"enum": formats}} if formats else {"type": "array"}
    return _closed(["type", "values"], {"type": {"const": "enum"}, "values": values})


_SOURCES = _media(["url", "base64"])
# The page's "Constraint fields" table, per input modality.
_SUPPORTED_INPUTS = {
    "text": {"max_context_length": _LIMIT, "max_prompt_length": _LIMIT},
    "image": {"sources": _SOURCES, "formats": _media(), "detail_levels": _media(["auto", "low", "high", "original"]),
              "references": {"$ref": "descriptor"}, "role": _media(["reference", "first_frame", "last_frame"]),
              "max_content_size_bytes": _LIMIT},
    "video": {"sources": _SOURCES, "formats": _media(), "max_duration_seconds": _NUMBER_LIMIT,
              "max_content_size_bytes": _LIMIT},
    "audio": {"sources": _SOURCES, "formats": _media(), "max_duration_seconds": _NUMBER_LIMIT,
              "max_content_size_bytes": _LIMIT},
    "file": {"sources": _SOURCES, "formats": _media(), "references": {"$ref": "descriptor"},
             "max_content_size_bytes": _LIMIT},
}
_INPUT_MODALITY = {"oneOf": [
    _closed(["type"], {"type": {"const": kind}, "supported_inputs": _closed([], constraints),
                       "pricing": {"type": "array", "items": _INPUT_PRICE}, "capacity": _INPUT_CAPACITY,
                       "passthrough_parameters": _DESCRIPTORS})
    for kind, constraints in _SUPPORTED_INPUTS.items()
]}
_OUTPUT_MODALITY = {
    **_closed(["type", "supported_parameters"], {
        "type": {"enum": OUTPUT_MODALITIES}, "supported_parameters": _DESCRIPTORS, "streaming": _BOOLEAN,
        "max_length": _LIMIT, "pricing": {"type": "array", "items": _OUTPUT_PRICE}, "capacity": _OUTPUT_CAPACITY,
        "passthrough_parameters": _DESCRIPTORS}),
    "allOf": [
        # "max_length: Maximum output length (text only)"; streaming does not apply to embeddings or rerank.
        {"if": {"properties": {"type": {"not": {"const": "text"}}}}, "then": {"properties": {"max_length": False}}},
        {"if": {"properties": {"type": {"enum": ["embeddings", "rerank"]}}},
         "then": {"properties": {"streaming": False}}},
    ],
}
V24_MODEL: dict[str, Any] = _closed(["schema_version", "id", "name", "input_modalities", "output_modalities"], {
    "schema_version": {"const": "2.4"},
    "id": _NONEMPTY, "name": _NONEMPTY, "hugging_face_id": _STRING, "created": {"type": "integer"},
    "quantization": {"enum": [*QUANTIZATIONS, None]}, "tokenizer": _NONEMPTY, "description": _STRING,
    "input_modalities": {"type": "array", "minItems": 1, "items": _INPUT_MODALITY},
    "output_modalities": {"type": "array", "minItems": 1, "items": _OUTPUT_MODALITY},
    "pricing": {"type": "array", "items": _REQUEST_PRICE}, "capacity": _ROOT_CAPACITY,
    "passthrough_parameters": _DESCRIPTORS,
    "deprecation_date": _DEPRECATION, "is_ready": _BOOLEAN, "is_free": _BOOLEAN, "discount_to_user": _DISCOUNT,
    "openrouter": _SLUG,
    "datacenters": {"type": "array", "items": _closed(["country_code"], {"country_code": _COUNTRY,
                                                                        "region": _STRING})},
    "deployment_region": _NONEMPTY,
    # "Additional boolean certification flags ... may be added over time."
    "compliance": {"type": "object", "additionalProperties": _BOOLEAN},
})
# The list: `data` only; `schema_version` belongs to each document, not to the list.
V24_LISTING: dict[str, Any] = _closed(["data"], {"data": {"type": "array", "items": V24_MODEL}})


def validator(schema: dict[str, Any]) -> Draft202012Validator:
    """A Draft 2020-12 validator that resolves the descriptor's `$ref`s inside `schema`."""
    registry = Registry().with_resource("descriptor", DRAFT202012.create_resource(DESCRIPTOR))
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, registry=registry)
