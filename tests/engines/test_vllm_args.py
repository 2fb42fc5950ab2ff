"""The vLLM command builder: pure unit tests, then the built flags fed to the pinned vLLM's own parser."""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

import worker.engines.vllm_args as vllm_args_module
from worker.config import ModelConfig
from worker.config.loader import parse_node_config
from worker.engines.vllm_args import (
    STORE_TRUE_ONLY_FLAGS,
    VLLM_SERVER_MODULE,
    build_vllm_args,
    engine_arg_flags,
    vllm_env,
    vllm_launch_command,
)

PRICING = {"prompt_per_mtok": "0.10", "completion_per_mtok": "0.40"}


def make_model(**fields: Any) -> ModelConfig:
    defaults: dict[str, Any] = {"id": "acme/chat-8b", "source": "acme/Chat-8B", "pricing": PRICING}
    return ModelConfig.model_validate({**defaults, **fields})


def flag_value(args: list[str], flag: str) -> str:
    assert args.count(flag) == 1, f"{flag} appears {args.count(flag)} times in {args}"
    return args[args.index(flag) + 1]


# --- pure unit tests -------------------------------------------------------------------------------


def test_core_flags_name_model_address_and_parallelism() -> None:
    args = build_vllm_args(make_model(gpus_per_replica=2), "127.0.0.1", 8101)

    assert flag_value(args, "--model") == "acme/Chat-8B"
    assert flag_value(args, "--served-model-name") == "acme/chat-8b"
    assert flag_value(args, "--host") == "127.0.0.1"
    assert flag_value(args, "--port") == "8101"
    assert flag_value(args, "--tensor-parallel-size") == "2"
    assert "--disable-uvicorn-access-log" in args
    assert "--enable-server-load-tracking" in args
    assert "--enable-prompt-tokens-details" in args  # cached tokens are billed at the cache-read price


def test_embedding_models_are_not_asked_for_prompt_token_details() -> None:
    assert "--enable-prompt-tokens-details" not in build_vllm_args(make_model(task="embed"), "127.0.0.1", 1)


def test_revision_only_when_set() -> None:
    assert "--revision" not in build_vllm_args(make_model(), "127.0.0.1", 8101)
    args = build_vllm_args(make_model(revision="a1b2c3"), "127.0.0.1", 8101)
    assert flag_value(args, "--revision") == "a1b2c3"


def test_engine_args_become_dashed_flags_with_string_values() -> None:
    flags = engine_arg_flags({"max_model_len": 8192, "gpu_memory_utilization": 0.9, "kv-cache-dtype": "fp8"})
    assert flags == ["--max-model-len", "8192", "--gpu-memory-utilization", "0.9", "--kv-cache-dtype", "fp8"]


def test_booleans_are_bare_flags_or_negated_flags() -> None:
    assert engine_arg_flags({"enforce_eager": True}) == ["--enforce-eager"]
    assert engine_arg_flags({"enable_prefix_caching": False}) == ["--no-enable-prefix-caching"]


def test_false_store_true_only_flag_is_left_out() -> None:
    assert engine_arg_flags({"disable_log_stats": False}) == []
    assert engine_arg_flags({"disable_log_stats": True}) == ["--disable-log-stats"]


def test_dict_values_are_compact_json_and_none_is_skipped() -> None:
    flags = engine_arg_flags({"hf_overrides": {"rope_scaling": {"factor": 4.0}}, "seed": None})
    assert flags == ["--hf-overrides", '{"rope_scaling":{"factor":4.0}}']


def test_list_values_are_refused() -> None:
    with pytest.raises(TypeError, match="list"):
        engine_arg_flags({"allowed_origins": ["a", "b"]})


def test_engine_args_come_last_so_they_override_worker_defaults() -> None:
    args = build_vllm_args(make_model(engine_args={"enable_server_load_tracking": False}), "127.0.0.1", 8101)
    assert args.index("--no-enable-server-load-tracking") > args.index("--enable-server-load-tracking")


def test_embedding_models_get_the_pooling_runner() -> None:
    assert flag_value(build_vllm_args(make_model(task="embed"), "127.0.0.1", 8101), "--runner") == "pooling"
    assert "--runner" not in build_vllm_args(make_model(), "127.0.0.1", 8101)


def test_explicit_runner_in_engine_args_wins_over_task() -> None:
    args = build_vllm_args(make_model(task="embed", engine_args={"runner": "draft"}), "127.0.0.1", 8101)
    assert flag_value(args, "--runner") == "draft"


def test_quantization_label_is_not_a_vllm_flag_but_engine_args_is() -> None:
    assert "--quantization" not in build_vllm_args(make_model(quantization="bf16"), "h", 1)
    model = make_model(quantization="fp8", engine_args={"quantization": "awq"})
    assert flag_value(build_vllm_args(model, "h", 1), "--quantization") == "awq"


def test_launch_command_runs_the_server_module_with_the_given_python() -> None:
    model = make_model()
    command = vllm_launch_command("/opt/venv/bin/python", model, "127.0.0.1", 8101)
    assert command[:3] == ["/opt/venv/bin/python", "-m", VLLM_SERVER_MODULE]
    assert command[3:] == build_vllm_args(model, "127.0.0.1", 8101)


def test_gpu_env_pins_the_replica_gpus() -> None:
    env = vllm_env(make_model(gpus_per_replica=2), (2, 5), cpu=False)
    assert env["CUDA_VISIBLE_DEVICES"] == "2,5"
    assert "VLLM_CPU_KVCACHE_SPACE" not in env


def test_gpu_env_refuses_a_gpu_count_that_does_not_match_tensor_parallelism() -> None:
    with pytest.raises(ValueError, match="2 GPU"):
        vllm_env(make_model(gpus_per_replica=2), (0,), cpu=False)


def test_cpu_env_bounds_the_kv_cache_and_leaves_gpus_alone() -> None:
    env = vllm_env(make_model(), (), cpu=True)
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    assert "CUDA_VISIBLE_DEVICES" not in env


def test_engine_env_overrides_worker_defaults() -> None:
    model = make_model(engine_env={"VLLM_CPU_KVCACHE_SPACE": "4", "HF_HUB_OFFLINE": "1"})
    env = vllm_env(model, (), cpu=True)
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "4"
    assert env["HF_HUB_OFFLINE"] == "1"


def test_builder_imports_nothing_but_the_standard_library_and_worker() -> None:
    tree = ast.parse(Path(vllm_args_module.__file__).read_text(encoding="utf-8"))
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported - set(sys.stdlib_module_names) - {"__future__"} == {"worker"}


# --- against vLLM's real argument parser -----------------------------------------------------------

# A models.yaml of the kind operators write: every shape of engine_args value appears once.
CATALOG_YAML = """
worker:
  id: gpu-node-1
models:
  - id: meta-llama/Llama-3.1-8B-Instruct
    source: meta-llama/Llama-3.1-8B-Instruct
    revision: 0e9e39f249a16976918f6564b8830bc894c89659
    pricing: {prompt_per_mtok: 0.05, completion_per_mtok: 0.08}
    engine_args:
      max_model_len: 32768
      gpu_memory_utilization: 0.92
      max_num_seqs: 256
      max_num_batched_tokens: 8192
      enable_prefix_caching: true
      enable_chunked_prefill: true
      max_num_queued_reqs: 512
      shutdown_timeout: 30
      generation_config: vllm
  - id: Qwen/Qwen2.5-72B-Instruct-FP8
    source: Qwen/Qwen2.5-72B-Instruct
    gpus_per_replica: 4
    quantization: fp8
    pricing: {prompt_per_mtok: 0.35, completion_per_mtok: 0.40}
    engine_args:
      kv-cache-dtype: fp8
      max-model-len: 16384
      hf_overrides: {rope_scaling: {rope_type: yarn, factor: 4.0, original_max_position_embeddings: 32768}}
      override_generation_config: {temperature: 0.7}
      async_scheduling: false
      disable_log_stats: false
      enable_auto_tool_choice: true
      tool_call_parser: hermes
      seed: 0
  - id: BAAI/bge-m3
    source: BAAI/bge-m3
    task: embed
    pricing: {prompt_per_mtok: 0.01, completion_per_mtok: 0}
    engine_args:
      max_model_len: 8192
      enforce_eager: true
      dtype: float16
  - id: tiny-cpu
    source: /models/tiny
    pricing: {prompt_per_mtok: 0, completion_per_mtok: 0}
    engine_args: {dtype: bfloat16, max_model_len: 512, enforce_eager: true, trust_remote_code: false}
"""


@pytest.fixture(scope="module")
def vllm_parse() -> Any:
    """Parse a server argument list exactly as vLLM's OpenAI server entry point does."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser())

    def parse(args: list[str]) -> argparse.Namespace:
        try:
            namespace = parser.parse_args(args)
        except SystemExit:
            pytest.fail(f"vLLM's parser rejected {args} (its message is in the captured stderr)")
        validate_parsed_serve_args(namespace)
        AsyncEngineArgs.from_cli_args(namespace)  # the engine-side dataclass accepts every value
        return namespace

    parse.parser = parser  # type: ignore[attr-defined]
    return parse


def test_server_module_is_the_openai_server_entry_point() -> None:
    spec = importlib.util.find_spec(VLLM_SERVER_MODULE)
    assert spec is not None and spec.origin is not None
    source = Path(spec.origin).read_text(encoding="utf-8")
    assert "def main(" in source and 'if __name__ == "__main__":' in source


def test_real_parser_reads_the_core_flags(vllm_parse: Any) -> None:
    model = make_model(
        source="/models/tiny",
        revision="main",
        gpus_per_replica=2,
        engine_args={
            "dtype": "bfloat16",
            "max_model_len": 512,
            "enforce_eager": True,
            "hf_overrides": {"rope_theta": 500000.0},
            "enable_prefix_caching": False,
        },
    )
    parsed = vllm_parse(build_vllm_args(model, "127.0.0.1", 8101))

    assert parsed.model == "/models/tiny"
    assert parsed.served_model_name == ["acme/chat-8b"]
    assert (parsed.host, parsed.port) == ("127.0.0.1", 8101)
    assert parsed.revision == "main"
    assert parsed.tensor_parallel_size == 2
    assert parsed.dtype == "bfloat16"
    assert parsed.max_model_len == 512
    assert parsed.enforce_eager is True
    assert parsed.enable_prefix_caching is False
    assert parsed.hf_overrides == {"rope_theta": 500000.0}
    assert parsed.disable_uvicorn_access_log is True
    assert parsed.enable_server_load_tracking is True


def test_real_parser_serves_embedding_models_with_the_pooling_runner(vllm_parse: Any) -> None:
    parsed = vllm_parse(build_vllm_args(make_model(task="embed"), "127.0.0.1", 8101))
    assert parsed.runner == "pooling"


def test_real_parser_accepts_every_model_of_a_catalog(vllm_parse: Any) -> None:
    config = parse_node_config(yaml.safe_load(CATALOG_YAML))
    for model in config.models:
        parsed = vllm_parse(build_vllm_args(model, "127.0.0.1", 8200))
        assert parsed.served_model_name == [model.id]
        assert parsed.tensor_parallel_size == model.gpus_per_replica
        for key, value in model.engine_args.items():
            assert getattr(parsed, key) == value, f"{model.id}: {key}"
        if "quantization" not in model.engine_args:
            assert parsed.quantization is None


def boolean_options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {
        action.dest: action
        for action in parser._actions
        if action.nargs == 0 and not isinstance(action, argparse._HelpAction)
    }


def test_store_true_only_list_matches_the_pinned_vllm(vllm_parse: Any) -> None:
    options = boolean_options(vllm_parse.parser)
    without_negation = {
        dest for dest, action in options.items() if not isinstance(action, argparse.BooleanOptionalAction)
    }
    assert without_negation == STORE_TRUE_ONLY_FLAGS


def test_every_vllm_boolean_round_trips_true_and_false(vllm_parse: Any) -> None:
    parser = vllm_parse.parser
    for dest in boolean_options(parser):
        assert getattr(parser.parse_args(engine_arg_flags({dest: True})), dest) is True, dest
        assert getattr(parser.parse_args(engine_arg_flags({dest: False})), dest) is False, dest


def test_catalog_values_reach_vllm_as_json_where_vllm_expects_json(vllm_parse: Any) -> None:
    config = parse_node_config(yaml.safe_load(CATALOG_YAML))
    model = config.model("Qwen/Qwen2.5-72B-Instruct-FP8")
    assert model is not None
    args = build_vllm_args(model, "127.0.0.1", 8200)
    assert json.loads(flag_value(args, "--hf-overrides"))["rope_scaling"]["factor"] == 4.0
    assert vllm_parse(args).override_generation_config == {"temperature": 0.7}


def test_engine_gets_the_limits_admission_control_assumes() -> None:
    args = build_vllm_args(make_model(engine_args={}), "h", 1)
    assert flag_value(args, "--max-model-len") == "4096"
    assert flag_value(args, "--max-num-seqs") == "256"
    args = build_vllm_args(make_model(engine_args={"max_num_seqs": 8, "max_model_len": 512}), "h", 1)
    assert args.count("--max-num-seqs") == 1 and flag_value(args, "--max-num-seqs") == "8"
    assert args.count("--max-model-len") == 1 and flag_value(args, "--max-model-len") == "512"


# -- weights in object storage and hub downloads ---------------------------------------------------

S3_SOURCE = "s3://acme-models/chat-8b"


def test_s3_sources_are_read_with_the_runai_streamer_unless_engine_args_choose_its_sharded_form() -> None:
    assert flag_value(build_vllm_args(make_model(source=S3_SOURCE), "h", 1), "--load-format") == "runai_streamer"
    sharded = make_model(source=S3_SOURCE, engine_args={"load_format": "runai_streamer_sharded"})
    assert flag_value(build_vllm_args(sharded, "h", 1), "--load-format") == "runai_streamer_sharded"
    assert "--load-format" not in build_vllm_args(make_model(), "h", 1)


def test_s3_compatible_endpoint_reaches_the_streamer_with_path_style_buckets() -> None:
    env = vllm_env(make_model(source=S3_SOURCE), (), cpu=True, s3_endpoint_url="http://127.0.0.1:9000/",
                   inherited={"AWS_ACCESS_KEY_ID": "key", "AWS_SECRET_ACCESS_KEY": "secret"})
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000"
    assert env["RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING"] == "0"
    assert env["AWS_EC2_METADATA_DISABLED"] == "true"
    assert env["AWS_REGION"] == "us-east-1"  # the streamer refuses an endpoint without a region
    # Credentials are inherited by the engine, never copied into the worker's own additions.
    assert "AWS_ACCESS_KEY_ID" not in env and "AWS_SECRET_ACCESS_KEY" not in env


def test_the_standard_aws_endpoint_variable_works_too_and_a_region_already_set_is_kept() -> None:
    inherited = {"AWS_ENDPOINT_URL": "https://minio.internal", "AWS_DEFAULT_REGION": "eu-central-1"}
    env = vllm_env(make_model(source=S3_SOURCE), (), cpu=True, inherited=inherited)
    assert env["AWS_ENDPOINT_URL"] == "https://minio.internal"
    assert env["RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING"] == "0"
    assert "AWS_REGION" not in env


def test_aws_s3_itself_keeps_the_sdk_defaults_and_other_sources_get_no_s3_settings() -> None:
    env = vllm_env(make_model(source=S3_SOURCE), (), cpu=True)
    assert not {"AWS_ENDPOINT_URL", "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING", "AWS_REGION"} & env.keys()
    hub = vllm_env(make_model(), (), cpu=True, s3_endpoint_url="http://127.0.0.1:9000")
    assert "AWS_ENDPOINT_URL" not in hub


def test_hub_downloads_use_the_fast_xet_transfers_unless_the_operator_chose_otherwise() -> None:
    assert vllm_env(make_model(), (), cpu=True)["HF_XET_HIGH_PERFORMANCE"] == "1"
    assert "HF_XET_HIGH_PERFORMANCE" not in vllm_env(make_model(), (), cpu=True,
                                                     inherited={"HF_XET_HIGH_PERFORMANCE": "0"})


def test_real_parser_reads_an_s3_source_with_the_streamer(vllm_parse: Any) -> None:
    parsed = vllm_parse(build_vllm_args(make_model(source=S3_SOURCE, engine_args={
        "model_loader_extra_config": {"concurrency": 32}}), "127.0.0.1", 8101))
    assert parsed.model == S3_SOURCE
    assert parsed.load_format == "runai_streamer"
    assert parsed.model_loader_extra_config == {"concurrency": 32}
