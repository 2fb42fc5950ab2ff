"""deploy/kubernetes: every manifest validates, and the pieces agree with each other and with models.yaml."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest

from tests.deploy.deploy_support import (
    KUBERNETES,
    KUBERNETES_VERSION,
    SECRET_ENV_VARIABLES,
    Dockerfile,
    NodeShape,
    label_selector_matches,
    load_documents,
    manifest_files,
    node_shapes,
    render_kustomization,
)

PODMONITOR_SCHEMA = json.loads((Path(__file__).parent / "schemas" / "podmonitor.schema.json").read_text())
SHAPES = node_shapes()


def validate_manifest(document: dict[str, Any]) -> None:
    if document["apiVersion"].startswith("monitoring.coreos.com/"):
        # A CRD: kubernetes-validate knows only built-in kinds.
        jsonschema.Draft202012Validator(PODMONITOR_SCHEMA).validate(document)
    else:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


@pytest.fixture(params=SHAPES, ids=[shape.name for shape in SHAPES])
def shape(request: pytest.FixtureRequest) -> NodeShape:
    return request.param


def test_there_is_a_single_gpu_and_an_eight_gpu_shape() -> None:
    assert [s.name for s in SHAPES] == ["1-gpu", "8-gpu"]


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(KUBERNETES)))
def test_every_manifest_validates(path: Path) -> None:
    documents = load_documents(path)
    assert documents
    for document in documents:
        validate_manifest(document)


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


def test_grace_period_covers_pre_stop_drain_and_engine_stop(shape: NodeShape) -> None:
    worker = shape.node_config.worker
    pre_stop_s = shape.container["lifecycle"]["preStop"]["sleep"]["seconds"]
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
