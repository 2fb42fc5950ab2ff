"""`source: s3://bucket/prefix` in models.yaml and WORKER_S3_ENDPOINT_URL: what is accepted, what is refused and why."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.config import ConfigError, Settings, load_node_config

PRICING = "pricing: {prompt_per_mtok: 1, completion_per_mtok: 1}"


def load(tmp_path: Path, model: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "models.yaml"
    path.write_text(f"worker: {{id: w}}\nmodels:\n  - {{id: a, {model}, {PRICING}}}\n")
    return load_node_config(path).models[0]


def test_an_s3_prefix_is_a_vllm_source_in_object_storage(tmp_path: Path) -> None:
    model = load(tmp_path, "source: 's3://acme-models/llama-3.1-8b/instruct'")
    assert model.weights_in_object_storage
    assert not load(tmp_path, "source: meta-llama/Llama-3.1-8B-Instruct").weights_in_object_storage
    assert not load(tmp_path, "source: /models/llama").weights_in_object_storage


def test_the_streamers_own_load_formats_are_allowed(tmp_path: Path) -> None:
    model = load(tmp_path, "source: 's3://acme-models/llama', engine_args: {load_format: runai_streamer_sharded}")
    assert model.engine_args["load_format"] == "runai_streamer_sharded"


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("source: 's3://acme-models'", "s3://bucket/prefix"),  # the bucket's root is no checkpoint
        ("source: 's3://Acme_Models/llama'", "s3://bucket/prefix"),  # not a valid bucket name
        ("source: 'gs://acme-models/llama'", "s3://bucket/prefix"),
        ("source: 'https://example.com/llama'", "s3://bucket/prefix"),
        ("source: 's3://acme-models/llama', revision: main", "revision applies to Hugging Face sources only"),
        ("source: 's3://acme-models/llama', engine_args: {load-format: safetensors}",
         "cannot read s3:// sources"),
    ],
)
def test_bad_object_storage_sources_are_refused_naming_the_model(tmp_path: Path, model: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, model)
    assert "  models[0]:" in str(caught.value) and message in str(caught.value)


def test_mock_engines_ignore_the_source(tmp_path: Path) -> None:
    # `worker serve --engine mock` and mock entries with a production source must not need the bucket.
    assert not load(tmp_path, "engine: mock, source: 's3://acme-models/llama'").weights_in_object_storage


def test_s3_endpoint_comes_from_the_environment_and_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_S3_ENDPOINT_URL", "http://minio.internal:9000")
    assert str(Settings.from_env().s3_endpoint_url) == "http://minio.internal:9000/"
    monkeypatch.setenv("WORKER_S3_ENDPOINT_URL", "")
    assert Settings.from_env().s3_endpoint_url is None
    monkeypatch.setenv("WORKER_S3_ENDPOINT_URL", "minio.internal")
    with pytest.raises(ConfigError, match="WORKER_S3_ENDPOINT_URL:"):
        Settings.from_env()
