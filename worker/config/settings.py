"""Process-level settings from `WORKER_*` environment variables (secrets and deployment choices)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

from pydantic import Field, HttpUrl, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker.config.loader import ConfigError

# The admin token issues keys and money, the metrics token guards what the node reveals: long enough that
# guessing either, even at the admin API's limit on failed attempts, is hopeless (`openssl rand -hex 32`
# gives 64 characters).
MIN_TOKEN_CHARS = 32


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="WORKER_", extra="ignore", frozen=True)

    config: Path = Field(default=Path("models.yaml"), description="path to models.yaml")
    engine: Literal["auto", "config", "mock"] = Field(
        default="auto",
        description="auto: as configured where a GPU is present, else the CPU mock; config: as configured; "
        "mock: every model on the CPU mock engine",
    )
    engine_python: str = Field(default=sys.executable, description="Python interpreter that runs engines")
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    # Billing (keys, balances, ledger).
    auth: bool = Field(default=True, description="require API keys; switch off only for private deployments")
    ledger: bool = Field(default=True, description="record every request in the usage ledger; off only for "
                         "private deployments without billing (needs WORKER_AUTH=false)")
    db_url: str = Field(default="sqlite:///worker-ledger.db", description="sqlite:///PATH or postgresql://...")
    admin_token: SecretStr | None = Field(
        default=None, description=f"bearer token for /admin/*, at least {MIN_TOKEN_CHARS} characters (unset: "
        "the admin API is off)"
    )
    metrics_token: SecretStr | None = Field(
        default=None, description=f"bearer token for /metrics, /metrics/node and /capacity, at least "
        f"{MIN_TOKEN_CHARS} characters (unset: they are open; health endpoints are always open)"
    )
    db_synchronous: Literal["full", "normal"] = Field(
        default="normal",
        description="SQLite only. normal: records survive the worker process being killed (SIGKILL "
        "included), not a power loss or OS crash; a response's record is journaled in a file beside the "
        "database and committed in batches. full: every commit is also fsynced (records survive a power "
        "loss), at the cost of a commit and a disk sync before each batch of streams can end",
    )
    usage_webhook_url: HttpUrl | None = Field(
        default=None, description="POST every ledger record here, in order (Idempotency-Key: record id)"
    )
    usage_webhook_token: SecretStr | None = Field(default=None, description="bearer token for the usage webhook")

    # Router registry: announce this node, send heartbeats, say when it drains, deregister on exit.
    registry_url: HttpUrl | None = Field(
        default=None, description="base URL of the registry (unset: the node announces itself nowhere)"
    )
    registry_token: SecretStr | None = Field(default=None, description="bearer token for the registry")
    registry_heartbeat_s: float = Field(default=15.0, gt=0, description="seconds between heartbeats")
    registry_timeout_s: float = Field(default=5.0, gt=0, description="timeout of one registry call")
    public_url: HttpUrl | None = Field(
        default=None, description="this node's public base URL as routers reach it (overrides worker.public_url)"
    )

    # Weights in object storage (`source: s3://bucket/prefix`); credentials are the standard AWS_* variables.
    s3_endpoint_url: HttpUrl | None = Field(
        default=None, description="S3-compatible endpoint that s3:// model sources are read from (unset: "
        "AWS_ENDPOINT_URL if set, else AWS S3 itself)"
    )

    @field_validator("registry_url", "registry_token", "public_url", "s3_endpoint_url", mode="before")
    @classmethod
    def _empty_means_unset(cls, value: object) -> object:
        # Deployment templates blank out a variable they do not use instead of removing it.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("admin_token", "metrics_token", mode="before")
    @classmethod
    def _token_long_enough(cls, value: object) -> object:
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        if isinstance(text, str):
            if not text.strip():
                return None  # blanked out: the admin API is off, the monitoring pages open
            if len(text) < MIN_TOKEN_CHARS:
                raise ValueError(
                    f"must be at least {MIN_TOKEN_CHARS} characters (e.g. `openssl rand -hex 32`)"
                )
        return value

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        try:
            settings = cls(**overrides)  # type: ignore[arg-type]
        except ValidationError as error:
            lines = ["WORKER_* environment is invalid:"]
            for item in error.errors():
                name = "WORKER_" + "_".join(str(part) for part in item["loc"]).upper()
                lines.append(f"  {name}: {item['msg']}")
            raise ConfigError("\n".join(lines)) from None
        if not settings.ledger and settings.auth:
            # Keys without a ledger could be charged nothing and leave no record: refuse the mix.
            raise ConfigError("WORKER_* environment is invalid:\n  WORKER_LEDGER: false needs WORKER_AUTH=false "
                              "(API keys and balances live in the ledger's database)")
        return settings
