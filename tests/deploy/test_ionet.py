"""deploy/ionet: the container-deploy request body, its models.yaml and the placeholder filler."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from tests.deploy.deploy_support import DEPLOY, SECRET_ENV_VARIABLES, WORKER_ENV_VARIABLES, Dockerfile
from worker.cli.main import build_parser
from worker.cli.serve import run as serve_handler
from worker.config import load_node_config

IONET = DEPLOY / "ionet"
FULL_ENV = {
    "IONET_HARDWARE_ID": "206",
    "IONET_LOCATION_IDS": "3, 5",
    "WORKER_IMAGE": "registry.acme.test/worker:0.1.0-cuda-ionet",
    "REGISTRY_USERNAME": "acme",
    "REGISTRY_SECRET": "pull-token",
    "WORKER_ADMIN_TOKEN": "admin-secret",
    "WORKER_REGISTRY_URL": "https://registry.acme.test/workers",
    "WORKER_REGISTRY_TOKEN": "registry-secret",
    "WORKER_USAGE_WEBHOOK_URL": "https://billing.acme.test/usage",
    "WORKER_DB_URL": "postgresql://worker:pw@db.acme.test:5432/worker",
    "HF_TOKEN": "hf_secret",
}


def template() -> dict[str, Any]:
    return json.loads((IONET / "deploy.json").read_text(encoding="utf-8"))


def render(extra_env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("WORKER_", "IONET_", "REGISTRY_", "HF_TOKEN"))
    }
    env.update(extra_env)
    return subprocess.run(
        [sys.executable, str(IONET / "render.py")],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_body_has_every_field_of_the_deploy_api() -> None:
    body = template()
    assert isinstance(body["resource_private_name"], str) and body["resource_private_name"]
    for field in ("duration_hours", "gpus_per_container", "hardware_id"):
        assert isinstance(body[field], int), field
    assert isinstance(body["location_ids"], list) and all(isinstance(i, int) for i in body["location_ids"])
    container = body["container_config"]
    assert isinstance(container["replica_count"], int) and container["replica_count"] >= 1
    assert isinstance(container["env_variables"], dict) and isinstance(
        container["secret_env_variables"], dict
    )
    assert isinstance(container["entrypoint"], list) and isinstance(container["args"], list)
    assert isinstance(container["traffic_port"], int)
    assert set(body["registry_config"]) == {"image_url", "registry_username", "registry_secret"}


def test_gpus_traffic_port_and_config_match_the_baked_models_yaml() -> None:
    body = template()
    config = load_node_config(IONET / "models.yaml")
    # io.net's API reference: gpus_per_container must be 8.
    assert body["gpus_per_container"] == 8 == config.gpus_needed
    assert body["container_config"]["traffic_port"] == config.worker.port
    env = body["container_config"]["env_variables"]
    cuda = Dockerfile.load("Dockerfile.cuda")
    assert env["WORKER_CONFIG"] == cuda.env["WORKER_CONFIG"]
    assert env["HF_HOME"] == cuda.env["HF_HOME"]


def test_entrypoint_and_args_start_the_worker_server() -> None:
    container = template()["container_config"]
    assert container["entrypoint"] == Dockerfile.load("Dockerfile.cuda").exec_form("ENTRYPOINT")
    args = build_parser().parse_args(container["args"])
    assert args.handler is serve_handler


def test_secrets_stay_out_of_plain_variables() -> None:
    container = template()["container_config"]
    plain, secret = container["env_variables"], container["secret_env_variables"]
    assert set(secret) == SECRET_ENV_VARIABLES
    assert not set(plain) & SECRET_ENV_VARIABLES
    worker_variables = {key for key in [*plain, *secret] if key.startswith("WORKER_")}
    assert worker_variables <= WORKER_ENV_VARIABLES
    assert plain["WORKER_AUTH"] == "true" and plain["WORKER_ENGINE"] == "config"


def test_render_refuses_placeholders_and_names_what_is_missing() -> None:
    result = render({})
    assert result.returncode == 2 and result.stdout == ""
    for variable in [
        "IONET_HARDWARE_ID",
        "IONET_LOCATION_IDS",
        "WORKER_IMAGE",
        "WORKER_ADMIN_TOKEN",
        "HF_TOKEN",
    ]:
        assert variable in result.stderr


def test_render_fills_every_placeholder() -> None:
    result = render(FULL_ENV)
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert "CHANGE_ME" not in result.stdout
    assert body["hardware_id"] == 206 and body["location_ids"] == [3, 5]
    assert body["registry_config"]["image_url"] == FULL_ENV["WORKER_IMAGE"]
    assert body["container_config"]["secret_env_variables"]["WORKER_ADMIN_TOKEN"] == "admin-secret"
    # Fields without placeholders keep their values.
    assert body["gpus_per_container"] == 8 and body["container_config"]["args"] == ["serve"]


def test_render_drops_optional_entries_set_empty_but_never_the_admin_token() -> None:
    optional_off = {
        **FULL_ENV,
        "WORKER_REGISTRY_URL": "",
        "WORKER_REGISTRY_TOKEN": "",
        "REGISTRY_USERNAME": "",
        "REGISTRY_SECRET": "",
    }
    body = json.loads(render(optional_off).stdout)
    container = body["container_config"]
    assert "WORKER_REGISTRY_URL" not in container["env_variables"]
    assert "WORKER_REGISTRY_TOKEN" not in container["secret_env_variables"]
    assert body["registry_config"]["registry_username"] == ""  # a public image needs no credentials

    no_admin = render({**FULL_ENV, "WORKER_ADMIN_TOKEN": ""})
    assert no_admin.returncode == 2 and "WORKER_ADMIN_TOKEN" in no_admin.stderr


@pytest.mark.parametrize("variable, value", [("IONET_HARDWARE_ID", "h100"), ("IONET_LOCATION_IDS", "0")])
def test_render_rejects_bad_ids(variable: str, value: str) -> None:
    result = render({**FULL_ENV, variable: value})
    assert result.returncode == 2 and variable in result.stderr
