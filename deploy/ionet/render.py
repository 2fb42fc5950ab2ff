#!/usr/bin/env python3
"""Build io.net's container deploy request for this worker, check it, print it or submit it.

    .venv/bin/python deploy/ionet/render.py body [--redacted]   # print the request body (JSON)
    .venv/bin/python deploy/ionet/render.py deploy [--dry-run]  # submit it with io.net's SDK

The body is deploy.json with its placeholders filled from the environment (see README.md for the
variables), typed and validated by io.net's own SDK (`ionet-cloud`, `iocloud.types.DeployRequest`:
unknown fields are refused, `hardware_id` is an integer or a string id such as `gpu_1x_a6000`), plus
what only the worker knows: the GPUs and port of the models.yaml baked into the image, exactly one
location, and no CHANGE_ME left anywhere. When anything is missing or wrong nothing is printed or sent,
the exit status is 2 and stderr names every variable to fix.

Everything after the deploy (status, extend, delete, logs) is io.net's own CLI, `iocloud deployment ...`,
which comes with the same package.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "deploy.json"
MODELS_YAML = HERE / "models.yaml"
PLACEHOLDER = "CHANGE_ME"

# Top-level and nested fields of deploy.json, and the variable that fills each.
FIELD_SOURCES: dict[tuple[str, ...], str] = {
    ("resource_private_name",): "IONET_RESOURCE_NAME",
    ("duration_hours",): "IONET_DURATION_HOURS",
    ("hardware_id",): "IONET_HARDWARE_ID",
    ("location_ids",): "IONET_LOCATION",
    ("container_config", "replica_count"): "IONET_REPLICA_COUNT",
    ("registry_config", "image_url"): "WORKER_IMAGE",
    ("registry_config", "registry_username"): "REGISTRY_USERNAME",
    ("registry_config", "registry_secret"): "REGISTRY_SECRET",
}
# Fields an empty variable leaves out of the body.
OPTIONAL_FIELDS = frozenset({"registry_username", "registry_secret"})
# Without it the admin API is off and no API key can be issued: it cannot be dropped.
REQUIRED_ENTRIES = frozenset({"WORKER_ADMIN_TOKEN"})
# The SDK's Deployments.create documents `hours` as 1-8760 (prepaid, billed up front).
MAX_DURATION_HOURS = 8760
HARDWARE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
COUNTRY_CODE = re.compile(r"[A-Z]{2}")


class RenderError(Exception):
    """The body cannot be built; `problems` names each variable or field to fix."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = list(problems)


def parse_hardware_id(raw: str) -> int | str:
    """io.net's hardware ids are integers (`206`) or strings (`gpu_1x_a6000`)."""
    text = raw.strip()
    if text.isdigit():
        return int(text)
    if not HARDWARE_ID.fullmatch(text):
        raise ValueError(f"not a hardware id: {raw!r}")
    return text


def parse_location(raw: str) -> list[int | str]:
    """One location: an ISO 3166-1 alpha-2 country code (`US`) or a numeric location id."""
    parts = [part.strip() for part in raw.split(",") if part.strip()]
    if len(parts) != 1:
        raise ValueError(f"exactly one location is accepted by io.net today, got {len(parts)}")
    (location,) = parts
    if location.isdigit():
        return [int(location)]
    if not COUNTRY_CODE.fullmatch(location.upper()):
        raise ValueError(f"not a country code or location id: {location!r}")
    return [location.upper()]


def _parse(field: str, raw: str) -> Any:
    if field == "hardware_id":
        return parse_hardware_id(raw)
    if field == "location_ids":
        return parse_location(raw)
    if field in {"duration_hours", "replica_count"}:
        return int(raw)
    return raw


def _contains_placeholder(value: Any) -> bool:
    if isinstance(value, str):
        return PLACEHOLDER in value
    if isinstance(value, list):
        return any(_contains_placeholder(item) for item in value)
    return False


def fill(template: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """deploy.json with every placeholder replaced from `env`; RenderError lists what is left."""
    body: dict[str, Any] = json.loads(json.dumps(template))
    problems: list[str] = []
    for path, variable in FIELD_SOURCES.items():
        parent = body
        for key in path[:-1]:
            parent = parent[key]
        field = path[-1]
        if variable in env and field in OPTIONAL_FIELDS and env[variable] == "":
            del parent[field]  # a public image needs no registry credentials
            continue
        if variable in env:
            try:
                parent[field] = _parse(field, env[variable])
            except ValueError as error:
                problems.append(f"{variable} ({error})")
                continue
        if _contains_placeholder(parent[field]):
            problems.append(variable)
    container = body["container_config"]
    for section in ("env_variables", "secret_env_variables"):
        values: dict[str, str] = container[section]
        for name in list(values):
            if name in env:
                if env[name] == "" and name not in REQUIRED_ENTRIES:
                    del values[name]  # an optional entry switched off
                    continue
                values[name] = env[name]
            if _contains_placeholder(values[name]) or values[name] == "":
                problems.append(name)
    if problems:
        raise RenderError(problems)
    return body


def check_against_node_config(body: Mapping[str, Any], models_yaml: Path) -> list[str]:
    """What the worker knows and io.net cannot check: the baked models.yaml must fit the container."""
    from worker.config import load_node_config

    config = load_node_config(models_yaml)
    problems = []
    if body["gpus_per_container"] != config.gpus_needed:
        problems.append(
            f"gpus_per_container ({body['gpus_per_container']}) != GPUs {models_yaml.name} needs "
            f"({config.gpus_needed})"
        )
    traffic_port = body["container_config"]["traffic_port"]
    if traffic_port != config.worker.port:
        problems.append(
            f"traffic_port ({traffic_port}) != worker.port in {models_yaml.name} ({config.worker.port})"
        )
    return problems


def build_request(
    template: Mapping[str, Any], env: Mapping[str, str], models_yaml: Path = MODELS_YAML
) -> Any:
    """The validated `iocloud.types.DeployRequest`, or RenderError naming every problem."""
    from iocloud.types import DeployRequest

    body = fill(template, env)
    problems = check_against_node_config(body, models_yaml)
    if not 1 <= body["duration_hours"] <= MAX_DURATION_HOURS:
        problems.append(f"IONET_DURATION_HOURS ({body['duration_hours']}: 1 to {MAX_DURATION_HOURS})")
    try:
        request = DeployRequest.model_validate(body)
    except ValidationError as error:
        problems += [
            f"{'.'.join(str(part) for part in item['loc'])}: {item['msg']}" for item in error.errors()
        ]
    if problems:
        raise RenderError(problems)
    return request


def _load_template() -> dict[str, Any]:
    return json.loads(TEMPLATE.read_text(encoding="utf-8"))


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command")
    body_command = commands.add_parser("body", help="print the request body (the default)")
    body_command.add_argument("--redacted", action="store_true", help="mask secret values")
    deploy_command = commands.add_parser("deploy", help="submit the request with io.net's SDK")
    deploy_command.add_argument(
        "--dry-run", action="store_true", help="print the redacted body and send nothing"
    )
    for command in (body_command, deploy_command):
        command.add_argument(
            "--models-yaml", type=Path, default=MODELS_YAML, help="the models.yaml baked into the image"
        )
    args = parser.parse_args(argv)
    command = args.command or "body"
    environment = os.environ if env is None else env

    try:
        request = build_request(_load_template(), environment, getattr(args, "models_yaml", MODELS_YAML))
    except RenderError as error:
        print(
            "render.py: fix these (an empty string drops an optional entry): " + ", ".join(error.problems),
            file=sys.stderr,
        )
        return 2

    if command == "body" or args.dry_run:
        redacted = command == "deploy" or args.redacted
        payload = request.redacted_payload() if redacted else request.to_payload()
        json.dump(payload, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0

    import iocloud

    # API key: IOCLOUD_API_KEY, else what `iocloud auth login` stored; API root: IOCLOUD_BASE_URL.
    try:
        with iocloud.Client() as client:
            deployment = client.deployments.submit(request)
    except iocloud.IONetError as error:
        print(f"render.py: io.net refused the deployment: {error}", file=sys.stderr)
        return 1
    print(json.dumps({"deployment_id": deployment.id, "status": str(deployment.status)}))
    print(
        f"next: iocloud deployment get {deployment.id}   # status, minutes remaining\n"
        f"      iocloud deployment containers {deployment.id}   # public_url of each container",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
