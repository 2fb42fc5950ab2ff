#!/usr/bin/env python3
"""Fill deploy.json's placeholders from the environment and print the request body.

    IONET_HARDWARE_ID=... IONET_LOCATION_IDS=1,2 WORKER_IMAGE=... WORKER_ADMIN_TOKEN=... \
        python3 deploy/ionet/render.py > body.json

Every placeholder (a string containing CHANGE_ME, hardware_id 0, a location id 0) must be filled,
otherwise nothing is printed and the exit status is 2: a deployment never starts with a CHANGE_ME token.
An env_variables / secret_env_variables entry takes the variable of the same name; setting that variable
to the empty string drops the entry (say, no registry), except WORKER_ADMIN_TOKEN. Standard library only.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

TEMPLATE = Path(__file__).with_name("deploy.json")
PLACEHOLDER = "CHANGE_ME"

# Top-level and registry fields, and the variable that fills each.
FIELD_SOURCES = {
    ("resource_private_name",): "IONET_RESOURCE_NAME",
    ("duration_hours",): "IONET_DURATION_HOURS",
    ("hardware_id",): "IONET_HARDWARE_ID",
    ("location_ids",): "IONET_LOCATION_IDS",
    ("container_config", "replica_count"): "IONET_REPLICA_COUNT",
    ("registry_config", "image_url"): "WORKER_IMAGE",
    ("registry_config", "registry_username"): "REGISTRY_USERNAME",
    ("registry_config", "registry_secret"): "REGISTRY_SECRET",
}
INTEGER_FIELDS = {"duration_hours", "hardware_id", "replica_count"}
# Without it the admin API is off and no API key can be issued: it cannot be dropped.
REQUIRED_ENTRIES = {"WORKER_ADMIN_TOKEN"}


def _parse(field: str, raw: str) -> Any:
    if field == "location_ids":
        return [int(part) for part in raw.split(",") if part.strip()]
    if field in INTEGER_FIELDS:
        return int(raw)
    return raw


def _is_placeholder(field: str, value: Any) -> bool:
    if isinstance(value, str):
        return PLACEHOLDER in value
    if field == "hardware_id":
        return value == 0
    if field == "location_ids":
        return not value or 0 in value
    return False


def render(template: dict[str, Any], env: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
    """The filled body, and the variables still needed (empty when the body is complete)."""
    body = json.loads(json.dumps(template))
    missing: list[str] = []
    for path, variable in FIELD_SOURCES.items():
        parent = body
        for key in path[:-1]:
            parent = parent[key]
        field = path[-1]
        if variable in env:
            try:
                parent[field] = _parse(field, env[variable])
            except ValueError:
                missing.append(f"{variable} (not a valid {field})")
                continue
        if _is_placeholder(field, parent[field]):
            missing.append(variable)
    container = body["container_config"]
    for section in ("env_variables", "secret_env_variables"):
        values: dict[str, str] = container[section]
        for name in list(values):
            if name in env:
                if env[name] == "" and name not in REQUIRED_ENTRIES:
                    del values[name]
                    continue
                values[name] = env[name]
            if _is_placeholder(name, values[name]) or values[name] == "":
                missing.append(name)
    return body, missing


def main() -> int:
    body, missing = render(json.loads(TEMPLATE.read_text(encoding="utf-8")), os.environ)
    if missing:
        print(
            "render.py: set these variables (empty string drops an optional entry): " + ", ".join(missing),
            file=sys.stderr,
        )
        return 2
    json.dump(body, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
