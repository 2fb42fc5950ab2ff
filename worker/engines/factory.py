"""Build the right Engine for a replica; the only place that branches on the engine kind."""

from __future__ import annotations

import os
from pathlib import Path

from worker.config import EngineKind, Settings, WorkerSection
from worker.engines.base import Engine, ReplicaSpec
from worker.engines.external import ExternalEngine
from worker.engines.process import ProcessEngine


class MockProcessEngine(ProcessEngine):
    kind = "mock"


class VllmProcessEngine(ProcessEngine):
    kind = "vllm"


def create_engine(spec: ReplicaSpec, settings: Settings, worker: WorkerSection, *, gpu_present: bool) -> Engine:
    model = spec.model
    if model.engine is EngineKind.external:
        return ExternalEngine(spec)
    if model.engine is EngineKind.mock:
        # Like vLLM's replicas, asked for cached prompt tokens in usage (billed at the cache-read price).
        mock = model.mock.model_copy(update={"enable_prompt_tokens_details": True})
        command = [settings.engine_python, "-m", "worker", "mock-engine", "--model-json",
                   model.model_copy(update={"mock": mock}).model_dump_json(), "--host", spec.host,
                   "--port", str(spec.port)]
        return MockProcessEngine(spec, command, env={}, stop_grace_s=worker.engine_stop_timeout_s,
                                 worker_id=worker.id)
    from worker.engines.vllm_args import vllm_env, vllm_launch_command

    # Weights on the hub are downloaded first with progress lines (vLLM's own download prints none).
    from_hub = not model.weights_in_object_storage and not Path(model.source).expanduser().is_dir()
    command = vllm_launch_command(settings.engine_python, model, spec.host, spec.port, download_first=from_hub)
    s3_endpoint_url = str(settings.s3_endpoint_url) if settings.s3_endpoint_url else None
    env = vllm_env(model, spec.gpu_ids, cpu=not gpu_present, s3_endpoint_url=s3_endpoint_url, inherited=os.environ)
    return VllmProcessEngine(spec, command, env=env, stop_grace_s=worker.engine_stop_timeout_s,
                             worker_id=worker.id)
