"""What a model is, as routers need it: every listing field resolved from models.yaml and its defaults."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from worker.config import ModelConfig

# OpenRouter's legacy enum, and the current (v2.4) one, which adds three microscaling formats.
LEGACY_QUANTIZATIONS = ("int4", "int8", "fp4", "fp6", "fp8", "fp16", "bf16", "fp32")
V24_QUANTIZATIONS = (*LEGACY_QUANTIZATIONS, "mxfp4", "nvfp4", "mxfp8")
_V24_TO_LEGACY = {"mxfp4": "fp4", "nvfp4": "fp4", "mxfp8": "fp8"}
# Other spellings met in models.yaml files: dtypes, and vLLM quantization methods by weight width.
_ALIASES = {
    "bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32",
    "awq": "int4", "gptq": "int4", "w4a16": "int4", "awq_marlin": "int4", "gptq_marlin": "int4",
    "w8a8": "int8", "w8a16": "int8", "fp8_e4m3": "fp8", "fp8_e5m2": "fp8", "modelopt_fp4": "nvfp4",
}

# Every sampling parameter of OpenRouter's list that vLLM's OpenAI server accepts (it has no top_a).
VLLM_SAMPLING_PARAMETERS = (
    "temperature", "top_p", "top_k", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty",
    "stop", "seed", "max_tokens", "logit_bias", "logprobs", "top_logprobs",
)


def quantization_v24(model: ModelConfig) -> str | None:
    """The model's quantization in the v2.4 enum, from `quantization` or else `engine_args.dtype`; None if unknown."""
    for label in (model.quantization, model.engine_args.get("dtype")):
        if isinstance(label, str):
            name = label.strip().lower()
            name = _ALIASES.get(name, name)
            if name in V24_QUANTIZATIONS:
                return name
    return None


def legacy_quantization(v24_value: str | None) -> str | None:
    """The legacy enum has no microscaling formats: they are listed by their element width."""
    return _V24_TO_LEGACY.get(v24_value, v24_value) if v24_value is not None else None


def _default_features(model: ModelConfig) -> tuple[str, ...]:
    args = model.engine_args
    features = ["json_mode", "structured_outputs", "logprobs"]
    # vLLM answers `tools` only when started with automatic tool choice and a parser for the model's format.
    if args.get("enable_auto_tool_choice") and args.get("tool_call_parser"):
        features.insert(0, "tools")
    if args.get("reasoning_parser"):
        features.append("reasoning")
    return tuple(features)


@dataclass(frozen=True)
class ModelDescription:
    id: str
    name: str
    description: str | None
    hugging_face_id: str | None
    quantization: str | None  # v2.4 enum value
    context_length: int
    max_output_length: int | None  # None for embedding models, which produce no tokens
    input_modalities: tuple[str, ...]
    output_modalities: tuple[str, ...]
    sampling_parameters: tuple[str, ...]
    features: tuple[str, ...]
    streaming: bool
    concurrency: int  # requests the model's replicas batch at once
    deprecation_date: date | None
    openrouter_slug: str | None

    @property
    def max_prompt_length(self) -> int:
        # vLLM refuses a generation prompt that leaves no room for one output token.
        return self.context_length if not self.streaming else max(self.context_length - 1, 1)


def describe_model(model: ModelConfig, context_length: int | None = None) -> ModelDescription:
    """`context_length`: the running engine's real limit when known, else models.yaml's max_model_len."""
    listing = model.listing
    embeds = model.task == "embed"
    limit = context_length if context_length is not None and context_length > 0 else model.max_model_len
    sampling: tuple[str, ...] = () if embeds else VLLM_SAMPLING_PARAMETERS
    if listing.supported_sampling_parameters is not None:
        sampling = tuple(listing.supported_sampling_parameters)
    features: tuple[str, ...] = () if embeds else _default_features(model)
    if listing.supported_features is not None:
        features = tuple(listing.supported_features)
    outputs = listing.output_modalities or (["embeddings"] if embeds else ["text"])
    max_output = None if embeds else min(listing.max_output_length or limit, limit)
    return ModelDescription(
        id=model.id,
        name=listing.name or model.id,
        description=listing.description,
        hugging_face_id=model.hugging_face_id,
        quantization=quantization_v24(model),
        context_length=limit,
        max_output_length=max_output,
        input_modalities=tuple(listing.input_modalities),
        output_modalities=tuple(outputs),
        sampling_parameters=sampling,
        features=features,
        streaming=not embeds,
        concurrency=model.replicas * model.max_num_seqs,
        deprecation_date=listing.deprecation_date,
        openrouter_slug=listing.openrouter_slug,
    )
