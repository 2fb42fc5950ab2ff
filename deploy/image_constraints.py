#!/usr/bin/env python3
"""Print the pip constraints Dockerfile.cuda installs the worker's dependencies with.

    python3 image_constraints.py constraints.txt > /tmp/image-constraints.txt

Every distribution the base image (vllm/vllm-openai) already has is pinned at its installed version,
so installing the worker never replaces a package vLLM was released and tested with; every other
dependency takes its version from deploy/constraints.txt, so the packages the worker adds are the same
in every build. When the base image's version of a package does not satisfy the worker, pip fails the
build instead of quietly changing vLLM's environment. Standard library only: it runs in the base image
before anything is installed.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")


def canonical(name: str) -> str:
    """PEP 503 normalised name: `Typing_Extensions` and `typing-extensions` are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_versions(lines: Iterable[str]) -> dict[str, str]:
    """`name==version` pins of a constraints file (comments and annotations skipped)."""
    pins: dict[str, str] = {}
    for line in lines:
        match = _PIN.match(line.strip())
        if match:
            pins[canonical(match[1])] = match[2]
    return pins


def merged_constraints(installed: Mapping[str, str], locked: Mapping[str, str]) -> list[str]:
    """Installed versions first; the lock only for what is not installed."""
    pins = {canonical(name): version for name, version in installed.items()}
    for name, version in locked.items():
        pins.setdefault(name, version)
    return [f"{name}=={version}" for name, version in sorted(pins.items())]


def installed_versions() -> dict[str, str]:
    """Name and version of each distribution Python imports: the first found on sys.path wins."""
    versions: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            versions.setdefault(canonical(name), dist.version)
    return versions


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    locked = locked_versions(Path(argv[1]).read_text(encoding="utf-8").splitlines())
    for line in merged_constraints(installed_versions(), locked):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
