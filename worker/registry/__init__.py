"""Routers and registries: the OpenRouter model listing, the engines' real context lengths, and registration."""

from worker.registry.client import CallCounts, RegistryClient, RetryPolicy
from worker.registry.context_lengths import EngineContextLengths, engine_context_length
from worker.registry.describe import ModelDescription, describe_model
from worker.registry.listing import (
    ModelCatalog,
    build_listing,
    build_listing_v24,
    build_openai_listing,
    readiness_by_model,
)
from worker.registry.metrics import RegistryCollector
from worker.registry.payloads import Announcement, DrainNotice, Heartbeat
from worker.registry.prices import per_token, usd_text

__all__ = [
    "Announcement",
    "CallCounts",
    "DrainNotice",
    "EngineContextLengths",
    "Heartbeat",
    "ModelCatalog",
    "ModelDescription",
    "RegistryClient",
    "RegistryCollector",
    "RetryPolicy",
    "build_listing",
    "build_listing_v24",
    "build_openai_listing",
    "describe_model",
    "engine_context_length",
    "per_token",
    "readiness_by_model",
    "usd_text",
]
