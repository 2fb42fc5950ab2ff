#!/usr/bin/env python3
"""Turn a CustomResourceDefinition into the JSON Schema fixture the manifest tests validate with.

    python tests/deploy/schemas/crd_to_schema.py CRD.yaml VERSION SOURCE > tests/deploy/schemas/NAME.schema.json

SOURCE is where CRD.yaml came from (a URL at a release tag); it is written into the fixture. The
result is the CRD's own `openAPIV3Schema` for VERSION, made usable by `jsonschema`:

- `apiVersion` and `kind` must be the CRD's; `metadata` must have a name;
- unknown fields are refused (`additionalProperties: false`) wherever the CRD's schema is structural
  and does not keep unknown fields, because the API server would silently drop them (a misspelt key
  would be lost, not reported);
- `nullable` becomes an allowed `null`, `x-kubernetes-int-or-string` an integer-or-string;
- descriptions and `x-kubernetes-*` annotations are dropped; CEL rules (`x-kubernetes-validations`)
  are therefore not checked, nor are `format`s.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

DROPPED = (
    "description",
    "x-kubernetes-validations",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-map-type",
    "x-kubernetes-embedded-resource",
)


def convert(node: Any) -> Any:
    if isinstance(node, list):
        return [convert(item) for item in node]
    if not isinstance(node, dict):
        return node
    keeps_unknown = node.get("x-kubernetes-preserve-unknown-fields") is True
    result = {
        key: convert(value)
        for key, value in node.items()
        if key not in DROPPED
        and key not in {"nullable", "x-kubernetes-preserve-unknown-fields", "x-kubernetes-int-or-string"}
    }
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in result:
        result["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in result:
        result["type"] = [result["type"], "null"]
    if "properties" in result and "additionalProperties" not in result and not keeps_unknown:
        result["additionalProperties"] = False
    return result


def schema_for(crd: dict[str, Any], version: str, source: str) -> dict[str, Any]:
    (entry,) = [item for item in crd["spec"]["versions"] if item["name"] == version]
    schema = convert(entry["schema"]["openAPIV3Schema"])
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    schema["properties"]["apiVersion"] = {"const": f"{group}/{version}"}
    schema["properties"]["kind"] = {"const": kind}
    schema["properties"]["metadata"] = {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"type": "string", "minLength": 1},
            "namespace": {"type": "string"},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    }
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata", "spec"})
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": (
            f"{kind} {group}/{version} from the CustomResourceDefinition at {source}, converted by "
            "tests/deploy/schemas/crd_to_schema.py (unknown fields refused; CEL rules and formats not checked)."
        ),
        **schema,
    }


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    crd = yaml.safe_load(Path(argv[1]).read_text(encoding="utf-8"))
    json.dump(schema_for(crd, argv[2], argv[3]), sys.stdout, separators=(",", ":"), sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
