"""`worker doctor`'s checks of what a node depends on beyond its hardware: the billing database, Hugging
Face access to the weights, shared memory for tensor parallelism, and the operator's tokens."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import asyncpg
from pydantic import SecretStr

from worker.billing.store.schema import LATEST_VERSION
from worker.config import EngineKind, ModelConfig, NodeConfig, Settings
from worker.registry.client import redacted_url

if TYPE_CHECKING:
    from huggingface_hub import HfApi

Status = Literal["PASS", "WARN", "FAIL", "SKIP"]
GIB = 1024**3
# vLLM's Kubernetes recipe for GPUs mounts a 2 GiB memory-backed /dev/shm "for tensor parallel inference"
# (docs/deployment/k8s.md); NCCL and PyTorch pass tensors between the ranks through it. Docker and
# Kubernetes give a container 64 MiB unless told otherwise, and tensor-parallel engines then crash.
MIN_SHM_FOR_TENSOR_PARALLEL = 2 * GIB
DATABASE_TIMEOUT_S = 5.0
SHM_PATH = Path("/dev/shm")


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    message: str
    detail: Mapping[str, object] = field(default_factory=dict)


def shm_size(path: Path = SHM_PATH) -> int | None:
    """Bytes of the shared-memory filesystem, None where there is none."""
    try:
        stats = os.statvfs(path)
    except OSError:
        return None
    return stats.f_frsize * stats.f_blocks


# -- billing database -------------------------------------------------------------------------------


def check_database(settings: Settings) -> Check:
    """The ledger's database answers and its schema is one this worker can use (or migrate to)."""
    if not settings.ledger:
        return Check("database", "SKIP", "usage ledger off (WORKER_LEDGER=false)")
    url = settings.db_url
    shown = _shown_database(url)
    try:
        if url.startswith("sqlite:///"):
            version = _sqlite_schema_version(Path(url[len("sqlite:///"):]))
        elif url.startswith(("postgresql://", "postgres://")):
            version = asyncio.run(_postgres_schema_version(url))
        else:
            return Check("database", "FAIL", "WORKER_DB_URL must start with sqlite:/// or postgresql://")
    except _NewDatabase as new:
        return Check("database", "PASS", f"{shown}: {new}; the worker creates it at schema version {LATEST_VERSION}",
                     {"url": shown, "schema_version": None})
    except (OSError, sqlite3.Error, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as error:
        reason = _database_error(error)
        return Check("database", "FAIL", f"{shown} unreachable: {reason}", {"url": shown})
    detail = {"url": shown, "schema_version": version, "worker_schema_version": LATEST_VERSION}
    if version > LATEST_VERSION:
        return Check("database", "FAIL", f"{shown} is at schema version {version}, newer than this worker's "
                                         f"{LATEST_VERSION}: upgrade the worker", detail)
    if version < LATEST_VERSION:
        return Check("database", "PASS", f"{shown} at schema version {version}; the worker migrates it to "
                                         f"{LATEST_VERSION} when it starts", detail)
    return Check("database", "PASS", f"{shown} at schema version {version}", detail)


class _NewDatabase(Exception):
    """The database has no billing schema yet; the worker creates it on start."""


def _sqlite_schema_version(path: Path) -> int:
    if not path.exists():
        directory = next((p for p in path.absolute().parents if p.exists()), Path("/"))
        if not os.access(directory, os.W_OK):
            raise PermissionError(f"cannot create {path}: {directory} is not writable")
        raise _NewDatabase(f"no database yet at {path}")
    # Read-only: the doctor must not migrate, lock or create anything.
    connection = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, timeout=DATABASE_TIMEOUT_S)
    try:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "schema_version" not in tables:
            if tables:
                raise sqlite3.DatabaseError(f"{path} holds tables but no billing schema_version")
            raise _NewDatabase(f"{path} is empty")
        return int(connection.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0])
    finally:
        connection.close()


async def _postgres_schema_version(url: str) -> int:
    connection = await asyncpg.connect(url, timeout=DATABASE_TIMEOUT_S)
    try:
        if await connection.fetchval("SELECT to_regclass('schema_version') IS NULL"):
            raise _NewDatabase("no billing schema yet")
        return int(await connection.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_version"))
    finally:
        await connection.close(timeout=DATABASE_TIMEOUT_S)


def _shown_database(url: str) -> str:
    return url if url.startswith("sqlite:") else redacted_url(url)  # no password in a PostgreSQL URL's place


def _database_error(error: BaseException) -> str:
    if isinstance(error, asyncpg.InvalidPasswordError | asyncpg.InvalidAuthorizationSpecificationError):
        return "the server refused the credentials"
    if isinstance(error, TimeoutError):
        return f"no answer within {DATABASE_TIMEOUT_S:g}s"
    if isinstance(error, sqlite3.Error | PermissionError | asyncpg.PostgresError):
        return str(error)
    return f"{type(error).__name__}: {error.strerror}" if isinstance(error, OSError) and error.strerror \
        else type(error).__name__


# -- Hugging Face -----------------------------------------------------------------------------------


def remote_weights(config: NodeConfig) -> list[ModelConfig]:
    """vLLM models whose weights come from the Hugging Face Hub (not a local directory or object storage)."""
    return [m for m in config.models if m.engine is EngineKind.vllm and not Path(m.source).is_dir()
            and "://" not in m.source]


def check_huggingface(config: NodeConfig, in_cache: Callable[[str], bool]) -> Check:
    """The token is set and every remote repository (gated ones included) is readable with it."""
    models = remote_weights(config)
    if not models:
        return Check("huggingface", "SKIP", "no model downloads weights from the Hugging Face Hub")
    # Imported here: only this check needs it, and `worker serve` imports the doctor's module.
    import huggingface_hub
    import huggingface_hub.constants

    if os.environ.get("HF_HUB_OFFLINE", "").upper() in huggingface_hub.constants.ENV_VARS_TRUE_VALUES:
        missing = [m.source for m in models if not in_cache(m.source)]
        if missing:
            return Check("huggingface", "FAIL", f"HF_HUB_OFFLINE is set and {', '.join(missing)} not in the cache",
                         {"missing": missing})
        return Check("huggingface", "PASS", "HF_HUB_OFFLINE: every model's weights are in the cache")
    token = huggingface_hub.get_token()
    # HF_ENDPOINT read now: huggingface_hub reads it once, when first imported.
    api = huggingface_hub.HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token or False)
    problems: list[str] = []
    for model in models:
        problem = _repository_problem(api, model, has_token=token is not None)
        if problem is not None:
            problems.append(problem)
    detail = {"endpoint": api.endpoint, "token": token is not None, "repositories": [m.source for m in models]}
    if problems:
        return Check("huggingface", "FAIL", "; ".join(problems), detail)
    if token is None:
        return Check("huggingface", "WARN", "no Hugging Face token (HF_TOKEN): public repositories download "
                                            "anonymously, at lower rate limits", detail)
    return Check("huggingface", "PASS", f"token set; {len(models)} repository(ies) readable", detail)


def _repository_problem(api: HfApi, model: ModelConfig, *, has_token: bool) -> str | None:
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo = model.source
    try:
        api.model_info(repo, revision=model.revision, timeout=10)
        api.auth_check(repo)  # a gated repository's metadata is public; its files need granted access
    except GatedRepoError:
        if not has_token:
            return f"{repo} is gated and no token is set (HF_TOKEN)"
        return f"{repo} is gated and the token's account has not been granted access (accept its terms on the Hub)"
    except RevisionNotFoundError:
        return f"{repo} has no revision {model.revision!r}"
    except RepositoryNotFoundError:
        return f"{repo} not found, or private and not readable with {'the' if has_token else 'no'} token"
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status == 401:
            return "the Hub refused the token (HF_TOKEN is invalid or expired)"
        return f"{repo}: the Hub answered HTTP {status}"
    except Exception as error:  # noqa: BLE001  any failure to reach the Hub is this check's finding
        return f"{repo}: the Hub is unreachable ({type(error).__name__})"
    return None


# -- shared memory ----------------------------------------------------------------------------------


def check_shm(config: NodeConfig, size: int | None) -> Check:
    parallel = [m.id for m in config.models if m.engine is EngineKind.vllm and m.gpus_per_replica > 1]
    detail = {"bytes": size, "needed_bytes": MIN_SHM_FOR_TENSOR_PARALLEL if parallel else 0,
              "tensor_parallel_models": parallel}
    shown = "none" if size is None else f"{size / GIB:.2f} GiB"
    if not parallel:
        return Check("shm", "PASS", f"/dev/shm {shown}; no model is tensor-parallel", detail)
    if size is None or size < MIN_SHM_FOR_TENSOR_PARALLEL:
        return Check("shm", "FAIL", f"/dev/shm {shown}; tensor-parallel models ({', '.join(parallel)}) need at "
                                    f"least {MIN_SHM_FOR_TENSOR_PARALLEL // GIB} GiB (docker run --ipc=host or "
                                    "--shm-size; Kubernetes: a memory emptyDir on /dev/shm)", detail)
    return Check("shm", "PASS", f"/dev/shm {shown}, enough for tensor parallelism", detail)


# -- tokens -----------------------------------------------------------------------------------------


# Tokens shorter than MIN_TOKEN_CHARS never get here: Settings refuses them, and the doctor reports that.


def check_admin_token(settings: Settings) -> Check:
    """Without it keys cannot be issued over HTTP and the node cannot be drained for maintenance."""
    token = _secret(settings.admin_token)
    if token is None:
        status: Status = "FAIL" if settings.auth else "WARN"
        return Check("admin_token", status, "WORKER_ADMIN_TOKEN unset: the admin API (keys, accounts, drain) "
                                            "answers 503")
    return Check("admin_token", "PASS", f"WORKER_ADMIN_TOKEN set ({len(token)} characters)")


def check_metrics_token(settings: Settings) -> Check:
    token = _secret(settings.metrics_token)
    if token is None:
        return Check("metrics_token", "WARN", "WORKER_METRICS_TOKEN unset: /metrics, /metrics/node and /capacity "
                                              "are open to anyone who reaches the node")
    if token == _secret(settings.admin_token):
        return Check("metrics_token", "FAIL", "WORKER_METRICS_TOKEN equals WORKER_ADMIN_TOKEN: whoever scrapes "
                                              "metrics could administer the node")
    return Check("metrics_token", "PASS", f"WORKER_METRICS_TOKEN set ({len(token)} characters)")


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None and value.get_secret_value() else None
