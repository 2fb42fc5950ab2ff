"""Read and validate `models.yaml`; turn pydantic errors into messages that name the field."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from worker.config.models import EngineKind, NodeConfig


class ConfigError(Exception):
    """A configuration file or value is invalid; the message names the field."""


def _field_path(location: tuple[int | str, ...]) -> str:
    path = ""
    for part in location:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "(root)"


def format_validation_error(source: str, error: ValidationError) -> str:
    lines = [f"{source} is invalid:"]
    for item in error.errors():
        lines.append(f"  {_field_path(item['loc'])}: {item['msg']}")
    return "\n".join(lines)


def parse_node_config(data: object, source: str = "models.yaml") -> NodeConfig:
    try:
        return NodeConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_validation_error(source, error)) from None


def load_node_config(path: str | Path) -> NodeConfig:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {error.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    return parse_node_config(data, str(path))


def with_engine_override(config: NodeConfig, engine: EngineKind) -> NodeConfig:
    """Serve every model of the file on `engine`, keeping ids, limits and prices."""
    models = [m.model_copy(update={"engine": engine}) for m in config.models]
    return config.model_copy(update={"models": models})
