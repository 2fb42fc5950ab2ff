"""models.yaml validation: good files load, bad ones fail with the field named."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from worker.config import ConfigError, EngineKind, Settings, load_node_config, with_engine_override
from worker.engines.supervisor import plan_replicas

REPO = Path(__file__).resolve().parents[2]


def test_repository_models_yaml_is_valid() -> None:
    config = load_node_config(REPO / "models.yaml")
    assert len(config.models) >= 2
    assert any(m.gpus_per_replica > 1 for m in config.models)  # a tensor-parallel example
    assert all(isinstance(m.pricing.prompt_per_mtok, Decimal) for m in config.models)


def test_yaml_floats_become_exact_decimals(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text("worker: {id: w}\nmodels:\n  - {id: a, source: s, pricing: {prompt_per_mtok: 0.1, "
                    "completion_per_mtok: 0.3}}\n")
    model = load_node_config(path).models[0]
    assert model.pricing.prompt_per_mtok == Decimal("0.1")
    assert model.pricing.completion_per_mtok == Decimal("0.3")


@pytest.mark.parametrize(
    ("snippet", "field"),
    [
        (("worker: {id: w, port: 70000}\nmodels: [{id: a, source: s, pricing: {prompt_per_mtok: 1, "
          "completion_per_mtok: 1}}]"), "worker.port"),
        (("worker: {id: '..'}\nmodels: [{id: a, source: s, pricing: {prompt_per_mtok: 1, "
          "completion_per_mtok: 1}}]"), "worker.id"),
        (("worker: {id: w, gateway_processes: 0}\nmodels: [{id: a, source: s, pricing: {prompt_per_mtok: 1, "
          "completion_per_mtok: 1}}]"), "worker.gateway_processes"),
        (("worker: {id: w}\nmodels: [{id: a, source: s, replicas: 0, pricing: {prompt_per_mtok: 1, "
          "completion_per_mtok: 1}}]"), "models[0].replicas"),
        (("worker: {id: w}\nmodels: [{id: a, source: s, engine: tpu, pricing: {prompt_per_mtok: 1, "
          "completion_per_mtok: 1}}]"), "models[0].engine"),
        (("worker: {id: w}\nmodels: [{id: a, source: s, engine_args: {tensor-parallel-size: 2}, "
          "pricing: {prompt_per_mtok: 1, completion_per_mtok: 1}}]"), "models[0].engine_args"),
        ("worker: {id: w}\nmodels: [{id: a, source: s, pricing: {prompt_per_mtok: -1, completion_per_mtok: 1}}]",
         "models[0].pricing.prompt_per_mtok"),
        (("worker: {id: w}\nmodels: [{id: a, source: 'not a url', engine: external, pricing: "
          "{prompt_per_mtok: 1, completion_per_mtok: 1}}]"), "models[0]"),
        (("worker: {id: w}\nmodels: [{id: a, source: s, colour: red, pricing: {prompt_per_mtok: 1, "
          "completion_per_mtok: 1}}]"), "models[0].colour"),
        (("worker: {id: w}\nmodels: [{id: a, source: s, pricing: {prompt_per_mtok: 1, completion_per_mtok: 1}}, "
          "{id: a, source: t, pricing: {prompt_per_mtok: 1, completion_per_mtok: 1}}]"), "models"),
    ],
)
def test_bad_fields_are_named(tmp_path: Path, snippet: str, field: str) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(snippet)
    with pytest.raises(ConfigError) as caught:
        load_node_config(path)
    assert f"  {field}:" in str(caught.value)


def test_unreadable_and_non_yaml_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_node_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("worker: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_node_config(bad)


def test_mock_override_keeps_ids_limits_and_prices() -> None:
    config = load_node_config(REPO / "models.yaml")
    mocked = with_engine_override(config, EngineKind.mock)
    assert [m.id for m in mocked.models] == [m.id for m in config.models]
    for before, after in zip(config.models, mocked.models, strict=True):
        assert after.engine is EngineKind.mock
        assert after.pricing == before.pricing and after.engine_args == before.engine_args


def test_gpus_are_assigned_without_overlap() -> None:
    config = load_node_config(REPO / "models.yaml")
    specs = plan_replicas(config, gpu_count=8)
    assigned = [gpu for spec in specs for gpu in spec.gpu_ids]
    assert len(assigned) == len(set(assigned)) == config.gpus_needed
    assert [len(s.gpu_ids) for s in specs] == [m.gpus_per_replica for m in config.models for _ in range(m.replicas)]
    assert len({s.port for s in specs}) == len(specs)
    with pytest.raises(ConfigError, match="GPUs but this node has"):
        plan_replicas(config, gpu_count=2)


def test_environment_settings_are_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_ENGINE", "tpu")
    with pytest.raises(ConfigError, match="WORKER_ENGINE:"):
        Settings.from_env()
