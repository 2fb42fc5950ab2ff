"""`worker.gpu_hour_usd` and the per-model override in models.yaml: exact decimals, checked at start-up."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
import yaml

from worker.config import ConfigError
from worker.config.loader import parse_node_config


def config(worker: dict[str, Any] | None = None, model: dict[str, Any] | None = None) -> Any:
    return parse_node_config({
        "worker": {"id": "node-1", **(worker or {})},
        "models": [{"id": "acme/chat", "engine": "mock", "source": "local/chat",
                    "pricing": {"prompt_per_mtok": "1", "completion_per_mtok": "2"}, **(model or {})}],
    })


def test_the_gpu_hour_price_defaults_to_zero_and_no_override() -> None:
    loaded = config()
    assert loaded.worker.gpu_hour_usd == Decimal(0)
    assert loaded.models[0].gpu_hour_usd is None


def test_prices_are_exact_decimals_even_when_yaml_reads_a_float() -> None:
    data = yaml.safe_load("gpu_hour_usd: 2.49")
    loaded = config({"gpu_hour_usd": data["gpu_hour_usd"]}, {"gpu_hour_usd": "3.10"})
    assert loaded.worker.gpu_hour_usd == Decimal("2.49")
    assert loaded.models[0].gpu_hour_usd == Decimal("3.10")


@pytest.mark.parametrize("bad", ["-0.01", "two", "NaN", "Infinity"])
def test_a_bad_worker_price_is_refused_naming_the_field(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"worker\.gpu_hour_usd"):
        config({"gpu_hour_usd": bad})


@pytest.mark.parametrize("bad", ["-1", "1,5", "free"])
def test_a_bad_model_price_is_refused_naming_the_field(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"models\[0\]\.gpu_hour_usd"):
        config(model={"gpu_hour_usd": bad})
