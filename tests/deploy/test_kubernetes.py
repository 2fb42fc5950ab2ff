"""deploy/kubernetes: every manifest validates, and the pieces agree with each other and with models.yaml."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.deploy.deploy_support import (
    KUBERNETES,
    KUBERNETES_VERSIONS,
    SECRET_ENV_VARIABLES,
    Dockerfile,
    NodeShape,
    label_selector_matches,
    load_documents,
    manifest_files,
    node_shapes,
    render_kustomization,
)
from worker.config import NodeConfig
from worker.config.loader import parse_node_config

SCHEMAS = Path(__file__).parent / "schemas"
# Custom resources: kubernetes-validate knows only built-in kinds, so these are checked against their
# CRD's schema (tests/deploy/schemas/README.md says where each comes from).
CRD_SCHEMAS = {
    "monitoring.coreos.com/v1": "podmonitor.schema.json",
    "leaderworkerset.x-k8s.io/v1": "leaderworkerset.schema.json",
    "inference.networking.k8s.io/v1": "inferencepool.schema.json",
    "gateway.networking.k8s.io/v1": "httproute.schema.json",
}
SHAPES = node_shapes()
LATEST = KUBERNETES_VERSIONS[-1]


def crd_schema(api_version: str) -> dict[str, Any]:
    return json.loads((SCHEMAS / CRD_SCHEMAS[api_version]).read_text(encoding="utf-8"))


def pod_templates(document: dict[str, Any]) -> list[dict[str, Any]]:
    """The pod templates of a LeaderWorkerSet (leader and workers)."""
    template = document["spec"]["leaderWorkerTemplate"]
    return [template[key] for key in ("leaderTemplate", "workerTemplate") if key in template]


def validate_manifest(document: dict[str, Any], version: str = LATEST) -> None:
    api_version = document["apiVersion"]
    if api_version not in CRD_SCHEMAS:
        kubernetes_validate.validate(document, version, strict=True)
        return
    jsonschema.Draft202012Validator(crd_schema(api_version)).validate(document)
    if document["kind"] == "LeaderWorkerSet":
        # The pods it creates, against the release's own Pod schema (the CRD copies an older PodSpec).
        for template in pod_templates(document):
            validate_pod_template(template, version)


def validate_pod_template(template: dict[str, Any], version: str) -> None:
    metadata = {"name": "template", **template.get("metadata", {})}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": template["spec"]}
    kubernetes_validate.validate(pod, version, strict=True)


@pytest.fixture(params=SHAPES, ids=[shape.name for shape in SHAPES])
def shape(request: pytest.FixtureRequest) -> NodeShape:
    return request.param


def test_there_is_a_single_gpu_and_an_eight_gpu_shape() -> None:
    assert [s.name for s in SHAPES] == ["1-gpu", "8-gpu"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(KUBERNETES)))
def test_every_manifest_validates(path: Path, version: str) -> None:
    documents = load_documents(path)
    assert documents
    for document in documents:
        validate_manifest(document, version)


def test_every_custom_resource_schema_names_its_source() -> None:
    for name in set(CRD_SCHEMAS.values()):
        comment = json.loads((SCHEMAS / name).read_text(encoding="utf-8"))["$comment"]
        assert name == "podmonitor.schema.json" or "https://github.com/" in comment, name


def test_validation_rejects_what_the_api_server_would() -> None:
    (deployment,) = load_documents(KUBERNETES / "1-gpu" / "deployment.yaml")
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["paht"] = "/x"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_manifest(broken)
    (monitor,) = load_documents(KUBERNETES / "monitoring" / "podmonitor.yaml")
    broken = json.loads(json.dumps(monitor))
    broken["spec"]["podMetricsEndpoints"][0]["interval"] = "15 seconds"
    with pytest.raises(jsonschema.ValidationError):
        validate_manifest(broken)
    del broken["spec"]["selector"]
    with pytest.raises(jsonschema.ValidationError):
        validate_manifest(broken)


def broken_copy(path: Path, change: Any) -> dict[str, Any]:
    (document,) = load_documents(path)
    broken = json.loads(json.dumps(document))
    change(broken["spec"])
    return broken


@pytest.mark.parametrize(
    "path, change",
    [
        ("multi-node/leaderworkerset.yaml", lambda spec: spec["leaderWorkerTemplate"].update(sise=2)),
        ("multi-node/leaderworkerset.yaml", lambda spec: spec["leaderWorkerTemplate"].update(size="two")),
        (
            "multi-node/leaderworkerset.yaml",
            lambda spec: spec["leaderWorkerTemplate"].update(restartPolicy="Always"),
        ),
        ("gie/inferencepool.yaml", lambda spec: spec["targetPorts"][0].update(number=70000)),
        ("gie/inferencepool.yaml", lambda spec: spec.pop("selector")),
        ("gie/inferencepool.yaml", lambda spec: spec["endpointPickerRef"].update(failureMode="Retry")),
        ("gie/httproute.yaml", lambda spec: spec["rules"][0].update(backendRef=[])),
        ("gie/httproute.yaml", lambda spec: spec["rules"][0]["matches"][0]["path"].update(type="Glob")),
    ],
)
def test_custom_resource_validation_rejects_what_the_api_server_would(path: str, change: Any) -> None:
    with pytest.raises(jsonschema.ValidationError):
        validate_manifest(broken_copy(KUBERNETES / path, change))


def test_pods_of_a_leader_worker_set_are_validated_as_pods() -> None:
    (document,) = load_documents(KUBERNETES / "multi-node" / "leaderworkerset.yaml")
    leader = json.loads(json.dumps(pod_templates(document)[0]))
    validate_pod_template(leader, KUBERNETES_VERSIONS[0])
    leader["spec"]["containers"][0]["livenessProbe"]["httpGet"]["paht"] = "/x"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_pod_template(leader, KUBERNETES_VERSIONS[0])


def test_kustomizations_only_list_resources_and_leave_no_manifest_out() -> None:
    referenced: set[Path] = set()
    for kustomization in KUBERNETES.glob("*/kustomization.yaml"):
        (document,) = load_documents(kustomization)
        # Anything beyond `resources` would transform the output, which render_kustomization ignores.
        assert set(document) == {"apiVersion", "kind", "resources"}, kustomization
        for entry in document["resources"]:
            target = (kustomization.parent / entry).resolve()
            assert target.exists(), f"{kustomization}: {entry} does not exist"
            referenced.add(target)
    unreferenced = {p.resolve() for p in manifest_files()} - referenced
    # The secret is an example on purpose: applying it would overwrite real credentials.
    assert unreferenced == {(KUBERNETES / "secret.example.yaml").resolve()}


def test_models_yaml_in_the_configmap_is_valid(shape: NodeShape) -> None:
    config = shape.node_config
    assert all(model.engine.value == "vllm" for model in config.models)


def test_gpu_limit_is_what_models_yaml_needs(shape: NodeShape) -> None:
    limits = shape.container["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) == shape.node_config.gpus_needed
    assert "nvidia.com/gpu" not in shape.container["resources"].get("requests", {})


def test_eight_gpu_shape_uses_eight_gpus() -> None:
    (eight,) = [s for s in SHAPES if s.name == "8-gpu"]
    assert eight.node_config.gpus_needed == 8


def test_probes_hit_the_health_endpoints_on_the_worker_port(shape: NodeShape) -> None:
    container = shape.container
    worker_port = shape.node_config.worker.port
    expected = {
        "startupProbe": "/health/ready",
        "livenessProbe": "/health/live",
        "readinessProbe": "/health/ready",
    }
    for probe, path in expected.items():
        http_get = container[probe]["httpGet"]
        assert http_get["path"] == path, probe
        assert shape.container_port(http_get["port"]) == worker_port, probe


def test_startup_probe_outlasts_the_engine_start_timeout(shape: NodeShape) -> None:
    probe = shape.container["startupProbe"]
    budget_s = probe["periodSeconds"] * probe["failureThreshold"]
    assert budget_s > shape.node_config.worker.engine_start_timeout_s


def test_liveness_tolerates_a_busy_event_loop(shape: NodeShape) -> None:
    probe = shape.container["livenessProbe"]
    assert probe["timeoutSeconds"] >= 3 and probe["periodSeconds"] * probe["failureThreshold"] >= 30


def pre_stop_seconds(container: dict[str, Any]) -> int:
    """The preStop delay: an exec of `sleep N`, which works on every Kubernetes release the manifests
    support (the `sleep` lifecycle action needs 1.30)."""
    pre_stop = container["lifecycle"]["preStop"]
    assert set(pre_stop) == {"exec"}
    command = pre_stop["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2
    return int(command[1])


def test_grace_period_covers_pre_stop_drain_and_engine_stop(shape: NodeShape) -> None:
    worker = shape.node_config.worker
    pre_stop_s = pre_stop_seconds(shape.container)
    assert pre_stop_s >= 1
    needed_s = pre_stop_s + worker.drain_grace_s + worker.engine_stop_timeout_s
    assert shape.pod_spec["terminationGracePeriodSeconds"] > needed_s


def test_service_and_pod_monitor_reach_the_pods(shape: NodeShape) -> None:
    service = shape.one("Service")
    assert label_selector_matches({"matchLabels": service["spec"]["selector"]}, shape.pod_labels)
    (service_port,) = service["spec"]["ports"]
    assert shape.container_port(service_port["targetPort"]) == shape.node_config.worker.port
    (monitor,) = render_kustomization(KUBERNETES / "monitoring")
    assert label_selector_matches(monitor["spec"]["selector"], shape.pod_labels)
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics"
    assert shape.container_port(endpoint["port"]) == shape.node_config.worker.port


def test_deployment_selects_its_own_pods(shape: NodeShape) -> None:
    deployment = shape.one("Deployment")
    assert label_selector_matches(deployment["spec"]["selector"], shape.pod_labels)


def test_pod_runs_as_the_images_user(shape: NodeShape) -> None:
    security = shape.pod_spec["securityContext"]
    uid = Dockerfile.load("Dockerfile.cuda").user_id()
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == uid and security["fsGroup"] == uid
    assert shape.container["securityContext"]["allowPrivilegeEscalation"] is False


def test_no_service_links_in_the_worker_environment(shape: NodeShape) -> None:
    # A Service named `worker` would otherwise inject WORKER_PORT=tcp://... and friends.
    assert shape.pod_spec["enableServiceLinks"] is False


def test_volumes_back_the_images_paths(shape: NodeShape) -> None:
    cuda = Dockerfile.load("Dockerfile.cuda")
    mounts = {mount["mountPath"]: mount["name"] for mount in shape.container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in shape.pod_spec["volumes"]}
    env = {item["name"]: item for item in shape.container["env"]}

    assert env["HF_HOME"]["value"] == cuda.env["HF_HOME"] == "/models"
    assert "persistentVolumeClaim" in volumes[mounts["/models"]]
    claim = volumes[mounts["/models"]]["persistentVolumeClaim"]["claimName"]
    assert shape.one("PersistentVolumeClaim")["metadata"]["name"] == claim

    config_path = Path(env["WORKER_CONFIG"]["value"])
    assert str(config_path) == cuda.env["WORKER_CONFIG"]
    config_volume = volumes[mounts[str(config_path.parent)]]
    assert config_volume["configMap"]["name"] == shape.one("ConfigMap")["metadata"]["name"]
    assert config_path.name in shape.one("ConfigMap")["data"]

    assert "/var/lib/worker" in mounts and "/dev/shm" in mounts
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"


def test_secrets_come_from_the_example_secret(shape: NodeShape) -> None:
    (secret,) = load_documents(KUBERNETES / "secret.example.yaml")
    keys = set(secret["stringData"])
    from_secrets = {
        item["name"]: item["valueFrom"]["secretKeyRef"]
        for item in shape.container["env"]
        if "valueFrom" in item
    }
    assert set(from_secrets) <= SECRET_ENV_VARIABLES
    assert set(from_secrets) >= {"WORKER_ADMIN_TOKEN", "WORKER_DB_URL"}
    for name, ref in from_secrets.items():
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in keys, name
    # Only the admin token is required to start the pod.
    assert [name for name, ref in from_secrets.items() if not ref.get("optional")] == ["WORKER_ADMIN_TOKEN"]
    plain = {item["name"] for item in shape.container["env"] if "value" in item}
    assert not plain & SECRET_ENV_VARIABLES


def test_image_is_pinned_and_rollouts_need_no_spare_gpu(shape: NodeShape) -> None:
    image = shape.container["image"]
    assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest")
    assert shape.container["args"] == Dockerfile.load("Dockerfile.cuda").exec_form("CMD")
    rolling = shape.one("Deployment")["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxSurge"] == 0


# --- GPU nodes ---------------------------------------------------------------------------------------

# GPU feature discovery's nvidia.com/gpu.product values (nvidia-smi's name, spaces as dashes) of cards
# with 80 GB and NVLink; docs/gpu-h100.md shows the H100's name as NVML reports it.
EIGHTY_GB_PRODUCTS = {"NVIDIA-H100-80GB-HBM3", "NVIDIA-A100-SXM4-80GB"}


def gpu_pod_specs() -> list[tuple[str, dict[str, Any]]]:
    specs = [(shape.name, shape.pod_spec) for shape in SHAPES]
    (lws,) = load_documents(KUBERNETES / "multi-node" / "leaderworkerset.yaml")
    specs += [(f"multi-node/{i}", template["spec"]) for i, template in enumerate(pod_templates(lws))]
    return specs


def required_node_terms(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    affinity = pod_spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    (term,) = affinity["nodeSelectorTerms"]
    return term["matchExpressions"]


@pytest.mark.parametrize("name, pod_spec", gpu_pod_specs(), ids=[name for name, _ in gpu_pod_specs()])
def test_gpu_pods_use_the_nvidia_runtime_class_and_tolerate_gpu_taints(
    name: str, pod_spec: dict[str, Any]
) -> None:
    assert pod_spec["runtimeClassName"] == "nvidia"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod_spec["tolerations"]
    for container in pod_spec["containers"]:
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1


def test_the_70b_model_at_32k_context_is_pinned_to_80_gb_cards() -> None:
    (eight,) = [s for s in SHAPES if s.name == "8-gpu"]
    (model,) = [m for m in eight.node_config.models if "70B" in m.id]
    assert model.engine_args["max_model_len"] == 32768 and model.gpus_per_replica == 4
    (expression,) = required_node_terms(eight.pod_spec)
    assert expression["key"] == "nvidia.com/gpu.product" and expression["operator"] == "In"
    assert set(expression["values"]) == EIGHTY_GB_PRODUCTS
    # The arithmetic of the manifest's comment: bf16 weights per GPU plus one full-length sequence's
    # KV cache (80 layers x 8 KV heads x head size 128 x K and V x 2 bytes per token) fit 80 GB, not 40.
    weights_per_gpu_gb = 70.6e9 * 2 / model.gpus_per_replica / 1e9
    kv_per_sequence_gb = 80 * 8 * 128 * 2 * 2 * 32768 / 1e9
    usable_gb = 80 * model.engine_args["gpu_memory_utilization"]
    assert weights_per_gpu_gb + kv_per_sequence_gb / model.gpus_per_replica < usable_gb
    # On 40 GB cards the weights alone leave under 2 GB per GPU for activations and the cache.
    assert 40 * model.engine_args["gpu_memory_utilization"] - weights_per_gpu_gb < 2


def test_the_one_gpu_shape_asks_for_a_card_with_room_for_the_kv_cache() -> None:
    (one,) = [s for s in SHAPES if s.name == "1-gpu"]
    (expression,) = required_node_terms(one.pod_spec)
    assert expression == {"key": "nvidia.com/gpu.memory", "operator": "Gt", "values": ["40000"]}


# --- A model over several nodes: LeaderWorkerSet -----------------------------------------------------

MULTI_NODE = KUBERNETES / "multi-node"
LWS_SCRIPT = "bash /vllm-workspace/examples/online_serving/multi-node-serving.sh"


def multi_node() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The LeaderWorkerSet, the leader's and the worker's pod specs."""
    documents = {doc["kind"]: doc for doc in render_kustomization(MULTI_NODE)}
    lws = documents["LeaderWorkerSet"]
    leader, worker = (template["spec"] for template in pod_templates(lws))
    return lws, leader, worker


def multi_node_config() -> NodeConfig:
    (configmap,) = [doc for doc in render_kustomization(MULTI_NODE) if doc["kind"] == "ConfigMap"]
    return parse_node_config(yaml.safe_load(configmap["data"]["models.yaml"]), "multi-node ConfigMap")


def test_group_size_and_gpus_are_the_models_pipeline_and_tensor_parallel_sizes() -> None:
    lws, leader, worker = multi_node()
    (model,) = multi_node_config().models
    assert model.engine_args["distributed_executor_backend"] == "ray"
    assert lws["spec"]["leaderWorkerTemplate"]["size"] == model.engine_args["pipeline_parallel_size"]
    for spec in (leader, worker):
        (container,) = spec["containers"]
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == model.gpus_per_replica
    # One group per worker.id, and a lost pod restarts its whole group.
    assert lws["spec"]["replicas"] == 1
    assert lws["spec"]["leaderWorkerTemplate"]["restartPolicy"] == "RecreateGroupOnPodRestart"


def test_leader_starts_the_ray_head_then_the_worker_and_workers_join_it_under_tini() -> None:
    _, leader, worker = multi_node()
    (leader_container,) = leader["containers"]
    (worker_container,) = worker["containers"]
    image_entrypoint = Dockerfile.load("Dockerfile.cuda").exec_form("ENTRYPOINT")
    for container in (leader_container, worker_container):
        assert container["command"][:2] == image_entrypoint[:2] == ["tini", "--"]
        assert container["command"][2:] == ["sh", "-c"] and container["image"] == SHAPES[0].container["image"]
    (leader_script,) = leader_container["args"]
    assert leader_script.startswith(f"{LWS_SCRIPT} leader --ray_cluster_size=$(LWS_GROUP_SIZE)")
    assert leader_script.endswith("&& exec worker serve")
    (worker_script,) = worker_container["args"]
    assert worker_script == f"{LWS_SCRIPT} worker --ray_address=$(LWS_LEADER_ADDRESS)"


def test_only_the_leader_serves_http_and_its_probes_outlast_the_load() -> None:
    _, leader, worker = multi_node()
    (leader_container,) = leader["containers"]
    config = multi_node_config()
    ports = {port["name"]: port["containerPort"] for port in leader_container["ports"]}
    assert ports["http"] == config.worker.port
    probe = leader_container["startupProbe"]
    assert probe["httpGet"] == {"path": "/health/ready", "port": "http"}
    assert probe["periodSeconds"] * probe["failureThreshold"] > config.worker.engine_start_timeout_s
    needed_s = (
        pre_stop_seconds(leader_container) + config.worker.drain_grace_s + config.worker.engine_stop_timeout_s
    )
    assert leader["terminationGracePeriodSeconds"] > needed_s
    (service,) = [doc for doc in render_kustomization(MULTI_NODE) if doc["kind"] == "Service"]
    assert service["spec"]["selector"] == {
        "leaderworkerset.sigs.k8s.io/name": "worker-405b",
        "role": "leader",
    }
    lws, _, _ = multi_node()
    assert lws["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["metadata"]["labels"]["role"] == "leader"
    assert "ports" not in worker["containers"][0]


# --- Gateway API Inference Extension ------------------------------------------------------------------

GIE = KUBERNETES / "gie"


def test_inference_pool_selects_the_worker_pods_on_their_port() -> None:
    (pool,) = load_documents(GIE / "inferencepool.yaml")
    for shape in SHAPES:
        assert label_selector_matches(pool["spec"]["selector"], shape.pod_labels)
        (target,) = pool["spec"]["targetPorts"]
        assert shape.container_port(target["number"]) == shape.node_config.worker.port
    (route,) = load_documents(GIE / "httproute.yaml")
    (rule,) = route["spec"]["rules"]
    (backend,) = rule["backendRefs"]
    assert backend == {"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": "worker"}


def test_the_endpoint_picker_reads_the_node_level_metrics_and_matches_the_pool() -> None:
    values = yaml.safe_load((GIE / "epp-values.yaml").read_text(encoding="utf-8"))
    (pool,) = load_documents(GIE / "inferencepool.yaml")
    assert values["inferenceExtension"]["metricsDataSource"]["path"] == "/metrics/node"
    # The chart creates the pool as the release (`helm install worker`) with picker `<release>-epp`.
    assert "helm install worker " in (GIE / "epp-values.yaml").read_text(encoding="utf-8")
    picker = pool["spec"]["endpointPickerRef"]
    assert picker["name"] == f"{pool['metadata']['name']}-epp"
    assert picker["port"]["number"] == values["inferenceExtension"]["extProcPort"]
    assert picker["failureMode"] == values["inferenceExtension"]["failureMode"]
    assert values["inferencePool"]["targetPorts"] == pool["spec"]["targetPorts"]
    assert values["inferencePool"]["modelServers"]["matchLabels"] == pool["spec"]["selector"]["matchLabels"]


def test_multi_node_secrets_come_from_the_example_secret() -> None:
    (secret,) = load_documents(KUBERNETES / "secret.example.yaml")
    _, leader, worker = multi_node()
    for spec in (leader, worker):
        (container,) = spec["containers"]
        for item in container["env"]:
            if "valueFrom" in item:
                ref = item["valueFrom"]["secretKeyRef"]
                assert item["name"] in SECRET_ENV_VARIABLES
                assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
            else:
                assert item["name"] not in SECRET_ENV_VARIABLES
