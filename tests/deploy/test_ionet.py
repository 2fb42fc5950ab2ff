"""deploy/ionet: the deploy request built with io.net's SDK types, its models.yaml, and the operator's
commands (render.py deploy, then `iocloud deployment get|containers|extend|delete`) against a stand-in
for io.net's API (respx): no network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
from click.testing import CliRunner
from iocloud.cli.main import cli as iocloud_cli
from iocloud.types import DeployRequest

from deploy.ionet import render
from tests.deploy.deploy_support import DEPLOY, SECRET_ENV_VARIABLES, WORKER_ENV_VARIABLES, Dockerfile
from worker.cli.main import build_parser
from worker.cli.serve import run as serve_handler
from worker.config import load_node_config

IONET = DEPLOY / "ionet"
API = "https://api.ionet.test"
CAAS = f"{API}/enterprise/v1/io-cloud/caas"
ADMIN_TOKEN = "admin-secret-0123456789abcdef0123456789"
FULL_ENV = {
    "IONET_HARDWARE_ID": "gpu_8x_h100_sxm5",
    "IONET_LOCATION": "us",
    "WORKER_IMAGE": "registry.acme.test/worker:0.1.0-cuda-ionet",
    "REGISTRY_USERNAME": "acme",
    "REGISTRY_SECRET": "pull-token",
    "WORKER_ADMIN_TOKEN": ADMIN_TOKEN,
    "WORKER_METRICS_TOKEN": "metrics-secret-0123456789abcdef01234567",
    "WORKER_REGISTRY_URL": "https://registry.acme.test/workers",
    "WORKER_REGISTRY_TOKEN": "registry-secret",
    "WORKER_USAGE_WEBHOOK_URL": "https://billing.acme.test/usage",
    "WORKER_DB_URL": "postgresql://worker:pw@db.acme.test:5432/worker",
    "HF_TOKEN": "hf_secret",
}


def template() -> dict[str, Any]:
    return json.loads((IONET / "deploy.json").read_text(encoding="utf-8"))


def run_render(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """render.py as the operator runs it, with only the given variables of ours set."""
    clean = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("WORKER_", "IONET_", "IOCLOUD_", "REGISTRY_", "HF_TOKEN"))
    }
    return subprocess.run(
        [sys.executable, str(IONET / "render.py"), *args],
        check=False,
        capture_output=True,
        text=True,
        env={**clean, **env},
        timeout=60,
    )


def problems(env: dict[str, str], **template_changes: Any) -> list[str]:
    with pytest.raises(render.RenderError) as raised:
        render.build_request({**template(), **template_changes}, env)
    return raised.value.problems


# --- the request body ------------------------------------------------------------------------------


def test_template_has_only_fields_of_the_sdks_deploy_request() -> None:
    # DeployRequest refuses unknown fields (extra="forbid"), as io.net's API does with a 422.
    request = DeployRequest.model_validate(template())
    assert request.container_config.traffic_port == 8000
    assert request.registry_config.image_url.startswith("registry.example.com/")


def test_gpus_traffic_port_and_config_match_the_baked_models_yaml() -> None:
    body = template()
    config = load_node_config(IONET / "models.yaml")
    # io.net pins gpus_per_container to 8 today (the SDK's DeployRequest docstring).
    assert body["gpus_per_container"] == 8 == config.gpus_needed
    assert body["container_config"]["traffic_port"] == config.worker.port
    env = body["container_config"]["env_variables"]
    cuda = Dockerfile.load("Dockerfile.cuda")
    assert env["WORKER_CONFIG"] == cuda.env["WORKER_CONFIG"]
    assert env["HF_HOME"] == cuda.env["HF_HOME"]


def test_entrypoint_and_args_start_the_worker_server_under_tini() -> None:
    container = template()["container_config"]
    # The body's entrypoint replaces the image's: it must keep tini as PID 1.
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


@pytest.mark.parametrize(
    "hardware, location, expected_hardware, expected_location",
    [
        ("gpu_8x_h100_sxm5", "us", "gpu_8x_h100_sxm5", ["US"]),
        ("206", "DE", 206, ["DE"]),
        ("H100_sxm5", "3", "H100_sxm5", [3]),
    ],
)
def test_hardware_ids_are_ints_or_strings_and_the_location_one_country(
    hardware: str, location: str, expected_hardware: int | str, expected_location: list[int | str]
) -> None:
    request = render.build_request(
        template(), {**FULL_ENV, "IONET_HARDWARE_ID": hardware, "IONET_LOCATION": location}
    )
    assert isinstance(request, DeployRequest)
    payload = request.to_payload()
    assert payload["hardware_id"] == expected_hardware and payload["location_ids"] == expected_location
    assert payload["registry_config"] == {
        "image_url": FULL_ENV["WORKER_IMAGE"],
        "registry_username": "acme",
        "registry_secret": "pull-token",
    }
    assert payload["container_config"]["secret_env_variables"]["WORKER_ADMIN_TOKEN"] == ADMIN_TOKEN


@pytest.mark.parametrize(
    "variable, value",
    [
        ("IONET_LOCATION", "US,DE"),  # io.net takes one location per deployment today
        ("IONET_LOCATION", "USA"),
        ("IONET_LOCATION", ""),
        ("IONET_HARDWARE_ID", "h100 sxm"),
        ("IONET_HARDWARE_ID", ""),
        ("IONET_DURATION_HOURS", "0"),
        ("IONET_DURATION_HOURS", "8761"),
        ("IONET_DURATION_HOURS", "a day"),
        ("IONET_REPLICA_COUNT", "two"),
    ],
)
def test_invalid_values_are_refused_by_name(variable: str, value: str) -> None:
    found = problems({**FULL_ENV, variable: value})
    assert any(problem.startswith(variable) for problem in found), found


def test_the_sdk_refuses_fields_io_net_does_not_know() -> None:
    container = {**template()["container_config"], "volumes": ["/models"]}  # io.net has no volumes
    found = problems(FULL_ENV, container_config=container)
    assert any(problem.startswith("container_config.volumes") for problem in found), found


def test_models_yaml_must_fit_the_container() -> None:
    with pytest.raises(render.RenderError) as raised:
        render.build_request({**template(), "gpus_per_container": 4}, FULL_ENV)
    assert any("gpus_per_container (4)" in problem for problem in raised.value.problems)


def test_render_refuses_placeholders_and_names_what_is_missing() -> None:
    result = run_render(env={})
    assert result.returncode == 2 and result.stdout == ""
    for variable in ["IONET_HARDWARE_ID", "IONET_LOCATION", "WORKER_IMAGE", "WORKER_ADMIN_TOKEN", "HF_TOKEN"]:
        assert variable in result.stderr


def test_render_prints_the_sdks_payload_and_masks_secrets_on_request() -> None:
    result = run_render("body", env=FULL_ENV)
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert "CHANGE_ME" not in result.stdout
    assert body == render.build_request(template(), FULL_ENV).to_payload()
    assert body["gpus_per_container"] == 8 and body["container_config"]["args"] == ["serve"]

    redacted = run_render("body", "--redacted", env=FULL_ENV)
    assert redacted.returncode == 0, redacted.stderr
    for secret in ("hf_secret", ADMIN_TOKEN, "metrics-secret", "pull-token", "registry-secret", "pw@db"):
        assert secret not in redacted.stdout
    assert json.loads(redacted.stdout)["container_config"]["secret_env_variables"]["HF_TOKEN"] == "***"


def test_render_drops_optional_entries_set_empty_but_never_the_admin_token() -> None:
    optional_off = {
        **FULL_ENV,
        "WORKER_REGISTRY_URL": "",
        "WORKER_REGISTRY_TOKEN": "",
        "REGISTRY_USERNAME": "",
        "REGISTRY_SECRET": "",
    }
    payload = render.build_request(template(), optional_off).to_payload()
    container = payload["container_config"]
    assert "WORKER_REGISTRY_URL" not in container["env_variables"]
    assert "WORKER_REGISTRY_TOKEN" not in container["secret_env_variables"]
    # A public image: no credentials are sent at all.
    assert payload["registry_config"] == {"image_url": FULL_ENV["WORKER_IMAGE"]}

    assert "WORKER_ADMIN_TOKEN" in problems({**FULL_ENV, "WORKER_ADMIN_TOKEN": ""})


# --- the operator's commands against a stand-in for io.net's API ------------------------------------


def deployment_details(deployment_id: str, **fields: Any) -> dict[str, Any]:
    return {
        "data": {
            "id": deployment_id,
            "status": "running",
            "name": "worker-ionet-01",
            "hardware_id": "gpu_8x_h100_sxm5",
            "gpus_per_container": 8,
            "total_containers": 1,
            "amount_paid": 480.0,
            "compute_minutes_served": 60,
            "compute_minutes_remaining": 1380,
            "locations": [{"id": 3, "iso2": "US", "name": "United States"}],
            **fields,
        }
    }


@pytest.fixture
def ionet_api(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[respx.MockRouter]:
    monkeypatch.setenv("IOCLOUD_API_KEY", "io-api-key")
    monkeypatch.setenv("IOCLOUD_BASE_URL", API)
    monkeypatch.setenv("HOME", str(tmp_path))  # the CLI's config and credential files
    with respx.mock(base_url=CAAS, assert_all_called=False) as api:
        yield api


def test_render_deploy_submits_the_rendered_request_through_the_sdk(
    ionet_api: respx.MockRouter, capsys: pytest.CaptureFixture[str]
) -> None:
    deploy = ionet_api.post("/deploy").respond(200, json={"status": "success", "deployment_id": "dep-1"})
    ionet_api.get("/deployment/dep-1").respond(200, json=deployment_details("dep-1", status="deploying"))

    assert render.main(["deploy"], env=FULL_ENV) == 0

    (call,) = deploy.calls
    assert call.request.headers["x-api-key"] == "io-api-key"
    sent = json.loads(call.request.content)
    assert sent == render.build_request(template(), FULL_ENV).to_payload()
    assert sent["hardware_id"] == "gpu_8x_h100_sxm5" and sent["location_ids"] == ["US"]
    assert sent["container_config"]["secret_env_variables"]["HF_TOKEN"] == "hf_secret"
    assert json.loads(capsys.readouterr().out) == {"deployment_id": "dep-1", "status": "deploying"}


def test_render_deploy_dry_run_and_bad_bodies_send_nothing(
    ionet_api: respx.MockRouter, capsys: pytest.CaptureFixture[str]
) -> None:
    deploy = ionet_api.post("/deploy").respond(200, json={"deployment_id": "never"})
    assert render.main(["deploy", "--dry-run"], env=FULL_ENV) == 0
    assert "hf_secret" not in capsys.readouterr().out
    assert render.main(["deploy"], env={**FULL_ENV, "IONET_LOCATION": "US,DE"}) == 2
    assert not deploy.called


def test_render_deploy_reports_io_nets_refusal(
    ionet_api: respx.MockRouter, capsys: pytest.CaptureFixture[str]
) -> None:
    ionet_api.post("/deploy").respond(422, json={"detail": "hardware not available in US"})
    assert render.main(["deploy"], env=FULL_ENV) == 1
    assert "refused" in capsys.readouterr().err


def iocloud(*args: str) -> Any:
    result = CliRunner().invoke(iocloud_cli, ["--json", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def test_status_is_iocloud_deployment_get_and_containers(ionet_api: respx.MockRouter) -> None:
    details = ionet_api.get("/deployment/dep-1").respond(200, json=deployment_details("dep-1"))
    containers = ionet_api.get("/deployment/dep-1/containers").respond(
        200,
        json={
            "data": {
                "containers": [
                    {"container_id": "c-1", "status": "running", "public_url": "https://c-1.ionet.test"}
                ]
            }
        },
    )
    shown = json.loads(iocloud("deployment", "get", "dep-1").stdout)
    assert shown["status"] == "running" and shown["compute_minutes_remaining"] == 1380
    listed = json.loads(iocloud("deployment", "containers", "dep-1").stdout)
    assert listed[0]["public_url"] == "https://c-1.ionet.test"
    assert details.called and containers.called


def test_extend_prepays_more_hours(ionet_api: respx.MockRouter) -> None:
    extend = ionet_api.post("/deployment/dep-1/extend").respond(
        200, json=deployment_details("dep-1", compute_minutes_remaining=2820)
    )
    iocloud("deployment", "extend", "dep-1", "--hours", "24", "--yes")
    (call,) = extend.calls
    assert json.loads(call.request.content) == {"duration_hours": 24}


def test_delete_destroys_the_deployment(ionet_api: respx.MockRouter) -> None:
    delete = ionet_api.delete("/deployment/dep-1").respond(200, json={"status": "success"})
    iocloud("deployment", "delete", "dep-1", "--yes")
    assert delete.call_count == 1
    assert isinstance(delete.calls[0].request, httpx.Request)


def documented_iocloud_commands() -> list[list[str]]:
    """Every `iocloud ...` line of README.md's shell blocks, as arguments (comments and pipes cut)."""
    import shlex

    commands = []
    for line in (IONET / "README.md").read_text(encoding="utf-8").splitlines():
        if line.startswith(".venv/bin/iocloud "):
            text = line.split("#", 1)[0].split("|", 1)[0]
            commands.append(shlex.split(text.replace('"$DEPLOYMENT_ID"', "dep-1"))[1:])
    return commands


def test_readme_uses_only_commands_and_options_the_sdk_has() -> None:
    commands = documented_iocloud_commands()
    verbs = {" ".join(args[:2]) for args in commands}
    assert {"deployment get", "deployment containers", "deployment extend", "deployment delete"} <= verbs
    for args in commands:
        # Click parses every option before --help acts: an unknown command or option fails here.
        result = CliRunner().invoke(iocloud_cli, [*args, "--help"])
        assert result.exit_code == 0, f"iocloud {' '.join(args)}: {result.output}"
