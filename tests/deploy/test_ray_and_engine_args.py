"""deploy/ray and every models.yaml shipped under deploy/: what reaches vLLM is what vLLM 0.32.0 accepts."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.deploy_support import DEPLOY, node_shapes
from worker.config import EngineKind, ModelConfig, NodeConfig, load_node_config
from worker.config.loader import parse_node_config
from worker.engines.vllm_args import build_vllm_args

RAY = DEPLOY / "ray"


def shipped_configs() -> dict[str, NodeConfig]:
    configs = {
        "ionet": load_node_config(DEPLOY / "ionet" / "models.yaml"),
        "ray": load_node_config(RAY / "models.yaml"),
    }
    for shape in node_shapes():
        configs[f"kubernetes/{shape.name}"] = shape.node_config
    return configs


def shipped_vllm_models() -> list[tuple[str, ModelConfig]]:
    return [
        (name, model)
        for name, config in shipped_configs().items()
        for model in config.models
        if model.engine is EngineKind.vllm
    ]


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_ray_model_spans_nodes_with_ray_pipeline_parallelism() -> None:
    config = load_node_config(RAY / "models.yaml")
    (model,) = config.models
    assert model.engine_args["distributed_executor_backend"] == "ray"
    assert model.engine_args["pipeline_parallel_size"] >= 2
    # The worker checks only its own node: one pipeline stage's GPUs (= tensor parallel size).
    assert config.gpus_needed == model.gpus_per_replica == 8
    args = build_vllm_args(model, "127.0.0.1", 8100)
    assert flag(args, "--tensor-parallel-size") == "8"
    assert flag(args, "--pipeline-parallel-size") == "2"
    assert flag(args, "--distributed-executor-backend") == "ray"


def test_ray_guide_gives_the_commands() -> None:
    guide = (RAY / "README.md").read_text(encoding="utf-8")
    for command in [
        "ray start --head --port=6379",
        "ray start --address=HEAD_IP:6379",
        "ray status",
        "export RAY_ADDRESS=HEAD_IP:6379",
        "worker serve --config deploy/ray/models.yaml --engine config",
    ]:
        assert command in guide, command


def test_tensor_parallel_size_cannot_be_set_through_engine_args() -> None:
    data = yaml.safe_load((RAY / "models.yaml").read_text(encoding="utf-8"))
    data["models"][0]["engine_args"]["tensor_parallel_size"] = 16
    with pytest.raises(Exception, match="tensor_parallel_size"):
        parse_node_config(data)


@pytest.fixture(scope="module")
def vllm_parse() -> Callable[[list[str]], argparse.Namespace]:
    """Parse a server argument list as vLLM 0.32.0's OpenAI server does, engine-side checks included."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser())

    def parse(args: list[str]) -> argparse.Namespace:
        try:
            namespace = parser.parse_args(args)
        except SystemExit:
            pytest.fail(f"vLLM's parser rejected {args}")
        validate_parsed_serve_args(namespace)
        AsyncEngineArgs.from_cli_args(namespace)
        return namespace

    return parse


@pytest.mark.parametrize(
    "source, model", shipped_vllm_models(), ids=lambda value: getattr(value, "id", value)
)
def test_shipped_models_start_with_flags_vllm_accepts(
    source: str, model: ModelConfig, vllm_parse: Any
) -> None:
    namespace = vllm_parse(build_vllm_args(model, "127.0.0.1", 8100))
    assert namespace.tensor_parallel_size == model.gpus_per_replica
    for key, value in model.engine_args.items():
        assert getattr(namespace, key) == value, (source, key)


@pytest.mark.parametrize(
    "source, model", shipped_vllm_models(), ids=lambda value: getattr(value, "id", value)
)
def test_quantization_reaching_vllm_is_a_vllm_method(
    source: str, model: ModelConfig, vllm_parse: Any
) -> None:
    """vLLM refuses an unknown --quantization when the engine starts ("Unknown quantization method").

    models.yaml's `quantization` is the router's listing value (bf16, fp8, ...); only values that are
    also vLLM quantization methods may be passed on.
    """
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

    namespace = vllm_parse(build_vllm_args(model, "127.0.0.1", 8100))
    assert namespace.quantization is None or namespace.quantization in QUANTIZATION_METHODS, (
        source,
        namespace.quantization,
    )


def test_every_shipped_models_yaml_is_covered() -> None:
    files = {p.relative_to(DEPLOY) for p in DEPLOY.rglob("models.yaml")}
    assert files == {Path("ionet/models.yaml"), Path("ray/models.yaml")}
    assert set(shipped_configs()) == {"ionet", "ray", "kubernetes/1-gpu", "kubernetes/8-gpu"}
