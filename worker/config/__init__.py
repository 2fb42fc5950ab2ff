"""Configuration: `models.yaml` (what to serve) and `WORKER_*` environment settings (how to run)."""

from worker.config.loader import ConfigError, load_node_config, with_engine_override
from worker.config.models import (
    DatacenterConfig,
    EngineKind,
    HttpLimitsConfig,
    MockEngineConfig,
    ModelConfig,
    NodeConfig,
    Pricing,
    WorkerSection,
)
from worker.config.settings import Settings

__all__ = [
    "ConfigError",
    "DatacenterConfig",
    "EngineKind",
    "HttpLimitsConfig",
    "MockEngineConfig",
    "ModelConfig",
    "NodeConfig",
    "Pricing",
    "Settings",
    "WorkerSection",
    "load_node_config",
    "with_engine_override",
]
