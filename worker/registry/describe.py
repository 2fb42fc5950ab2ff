"""What a model is, as routers need it: every listing field resolved from models.yaml and its defaults."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date

from worker.config import ModelConfig
from worker.registry.checkpoint import CheckpointFacts, declared_quantization

# Authors as OpenRouter names them ("Meta: Llama 3.1 8B Instruct"), for Hugging Face organisations whose
# name is not simply the author's; any other organisation is shown in title case ("my-org" -> "My Org").
_AUTHORS = {
    "meta-llama": "Meta", "mistralai": "Mistral", "deepseek-ai": "DeepSeek", "qwen": "Qwen", "google": "Google",
    "microsoft": "Microsoft", "nvidia": "NVIDIA", "openai": "OpenAI", "anthropic": "Anthropic",
    "ibm-granite": "IBM", "allenai": "AllenAI", "moonshotai": "MoonshotAI",
}
# Sizes written in lower case ("8b", "1.5b", "560m") read as "8B", "1.5B", "560M" in a display name.
_SIZE = re.compile(r"^\d+(\.\d+)?[bmkt]$")


def quantization_v24(model: ModelConfig) -> str | None:
    """The quantization models.yaml declares, in OpenRouter's enum; None if it declares none it maps."""
    return declared_quantization(model)


def display_name(model_id: str) -> str:
    """OpenRouter's "Author: Model Name": "meta-llama/Llama-3.1-8B-Instruct" -> "Meta: Llama 3.1 8B Instruct"."""
    author, _, model = model_id.rpartition("/")
    words = [_display_word(word) for word in re.split(r"[-_\s]+", model) if word]
    name = " ".join(words) or model_id
    if not author:
        return name
    organisation = author.rsplit("/", 1)[-1]
    shown = _AUTHORS.get(organisation.lower()) or " ".join(
        _display_word(word) for word in re.split(r"[-_\s]+", organisation) if word)
    return f"{shown}: {name}" if shown else name


def _display_word(word: str) -> str:
    if word != word.lower():
        return word  # the author's own capitals ("Llama", "8B", "GPT") stay as written
    return word.upper() if _SIZE.match(word) else word[:1].upper() + word[1:]


# Every sampling parameter of OpenRouter's list that vLLM's OpenAI server accepts (it has no top_a).
VLLM_SAMPLING_PARAMETERS = (
    "temperature", "top_p", "top_k", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty",
    "stop", "seed", "max_tokens", "logit_bias", "logprobs", "top_logprobs",
)


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
    quantization: str | None  # OpenRouter's enum value; None when undeclared
    tokenizer: str | None
    context_length: int
    max_output_length: int | None  # None for embedding models, which produce no tokens
    input_modalities: tuple[str, ...]
    output_modalities: tuple[str, ...]
    sampling_parameters: tuple[str, ...]
    features: tuple[str, ...]
    streaming: bool
    concurrency: int  # requests the model's replicas batch at once
    vocab_size: int | None  # from the checkpoint's config.json, when the weights are local
    deprecation_date: date | None
    openrouter_slug: str | None
    is_free: bool | None
    discount_to_user: float | None
    capacity_tpm: int | None
    deployment_region: str | None
    compliance: dict[str, bool] | None

    @property
    def max_prompt_length(self) -> int:
        # vLLM refuses a generation prompt that leaves no room for one output token.
        return self.context_length if not self.streaming else max(self.context_length - 1, 1)


def describe_model(model: ModelConfig, context_length: int | None = None, *,
                   checkpoint: CheckpointFacts | None = None) -> ModelDescription:
    """`context_length`: the running engine's real limit when known, else models.yaml's max_model_len.

    `checkpoint`: what the local weights' config.json adds (read once by the caller); None: models.yaml only.
    """
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
    compliance = listing.compliance.model_dump(exclude_none=True) if listing.compliance is not None else None
    return ModelDescription(
        id=model.id,
        name=listing.name or display_name(model.id),
        description=listing.description,
        hugging_face_id=model.hugging_face_id,
        quantization=checkpoint.quantization if checkpoint is not None else declared_quantization(model),
        tokenizer=listing.tokenizer,
        context_length=limit,
        max_output_length=max_output,
        input_modalities=tuple(listing.input_modalities),
        output_modalities=tuple(outputs),
        sampling_parameters=sampling,
        features=features,
        streaming=not embeds,
        concurrency=model.replicas * model.max_num_seqs,
        vocab_size=checkpoint.vocab_size if checkpoint is not None else None,
        deprecation_date=listing.deprecation_date,
        openrouter_slug=listing.openrouter_slug,
        is_free=listing.is_free,
        discount_to_user=listing.discount_to_user,
        capacity_tpm=listing.capacity_tpm,
        deployment_region=listing.deployment_region,
        compliance=compliance or None,
    )
