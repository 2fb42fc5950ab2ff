"""Shared helpers of the deployment tests: file locations, manifest loading, PromQL names, promtool."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from worker.config import NodeConfig
from worker.config.loader import parse_node_config

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
VENV_BIN = Path(sys.executable).parent

# The Kubernetes releases the manifests are validated against (kubernetes-validate's schemas): the
# oldest is the minimum the manifests need, the newest the latest release of kubernetes-validate>=1.35.
OLDEST_KUBERNETES_MINOR, NEWEST_KUBERNETES_MINOR = 29, 35
KUBERNETES_VERSIONS = [
    f"1.{minor}.0" for minor in range(OLDEST_KUBERNETES_MINOR, NEWEST_KUBERNETES_MINOR + 1)
]

# Every metric the worker exports (the engines' re-exported with labels model and replica).
WORKER_METRICS = frozenset(
    {
        "worker_requests_total",
        "worker_admission_rejections_total",
        "worker_replica_state",
        "worker_replica_restarts_total",
        "worker_ready",
        "worker_draining",
        "worker_ledger_backlog",
        "worker_outbox_backlog",
        "worker_gpu_temperature_celsius",
        "worker_gpu_power_watts",
        "worker_gpu_power_limit_watts",
        "worker_gpu_memory_used_bytes",
        "worker_gpu_memory_reserved_bytes",
        "worker_gpu_memory_total_bytes",
        "worker_gpu_utilization_ratio",
        "worker_gpu_xid_last",
        "worker_gpu_xid_events_total",
        "worker_gpu_ecc_uncorrected_volatile",
        "worker_gpu_remapped_rows_pending",
        "worker_gpu_remapped_rows_failed",
        "worker_gpu_throttle_reasons",
        "worker_gpu_pcie_replays_total",
        "worker_gpu_health",
        "worker_gpu_nvml_available",
        "worker_output_tokens_total",
        "worker_prompt_tokens_total",
        "worker_revenue_usd_total",
        "worker_gpu_seconds_attributed_total",
        "worker_gpu_hour_usd",
        "worker_gpus_provisioned",
        "worker_replica_busy_gpu_seconds_total",
        "worker_replica_gpu_info",
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:generation_tokens_total",
    }
)
WORKER_HISTOGRAMS = frozenset(
    {
        "worker_request_ttft_seconds",
        "worker_request_inter_token_seconds",
        "worker_request_e2e_seconds",
        "vllm:time_to_first_token_seconds",
    }
)
# Series names a query may use: gauges and counters as exported, histograms through their series.
EXPORTED_SERIES = WORKER_METRICS | {
    f"{name}{suffix}" for name in WORKER_HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")
}

# WORKER_* variables the worker reads (worker.config.settings and the registry/usage clients).
WORKER_ENV_VARIABLES = frozenset(
    {
        "WORKER_CONFIG",
        "WORKER_ENGINE",
        "WORKER_DB_URL",
        "WORKER_ADMIN_TOKEN",
        "WORKER_METRICS_TOKEN",
        "WORKER_AUTH",
        "WORKER_LOG_LEVEL",
        "WORKER_REGISTRY_URL",
        "WORKER_REGISTRY_TOKEN",
        "WORKER_USAGE_WEBHOOK_URL",
    }
)
SECRET_ENV_VARIABLES = frozenset(
    {"WORKER_ADMIN_TOKEN", "WORKER_METRICS_TOKEN", "WORKER_REGISTRY_TOKEN", "WORKER_DB_URL", "HF_TOKEN"}
)


# --- Kubernetes manifests -------------------------------------------------------------------------------


def load_documents(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc is not None]


def manifest_files() -> list[Path]:
    """Every Kubernetes manifest under deploy/kubernetes (kustomizations and Helm values are not)."""
    return sorted(
        p
        for p in KUBERNETES.rglob("*.yaml")
        if p.name != "kustomization.yaml" and not p.name.endswith("values.yaml")
    )


def render_kustomization(directory: Path) -> list[dict[str, Any]]:
    """The documents `kubectl apply -k directory` creates.

    The kustomizations here list resources only (a test makes sure), so rendering is reading the listed
    files and directories in order.
    """
    (kustomization,) = load_documents(directory / "kustomization.yaml")
    documents: list[dict[str, Any]] = []
    for entry in kustomization["resources"]:
        target = (directory / entry).resolve()
        documents += render_kustomization(target) if target.is_dir() else load_documents(target)
    return documents


@dataclass(frozen=True)
class NodeShape:
    """One rendered Kubernetes variant: its documents and the parts the tests look at."""

    name: str
    documents: list[dict[str, Any]]

    def one(self, kind: str) -> dict[str, Any]:
        (found,) = [doc for doc in self.documents if doc["kind"] == kind]
        return found

    @property
    def pod_spec(self) -> dict[str, Any]:
        return self.one("Deployment")["spec"]["template"]["spec"]

    @property
    def pod_labels(self) -> dict[str, str]:
        return self.one("Deployment")["spec"]["template"]["metadata"]["labels"]

    @property
    def container(self) -> dict[str, Any]:
        (container,) = self.pod_spec["containers"]
        return container

    @property
    def node_config(self) -> NodeConfig:
        text = self.one("ConfigMap")["data"]["models.yaml"]
        return parse_node_config(yaml.safe_load(text), f"{self.name} ConfigMap models.yaml")

    def container_port(self, name_or_number: str | int) -> int:
        for port in self.container["ports"]:
            if name_or_number in (port["name"], port["containerPort"]):
                return int(port["containerPort"])
        raise AssertionError(f"{self.name}: the container has no port {name_or_number!r}")


def node_shapes() -> list[NodeShape]:
    """The rendered kustomizations that run worker pods (not common/ or monitoring/)."""
    rendered = [
        (p.parent.name, render_kustomization(p.parent))
        for p in sorted(KUBERNETES.glob("*/kustomization.yaml"))
    ]
    return [
        NodeShape(name, docs) for name, docs in rendered if any(doc["kind"] == "Deployment" for doc in docs)
    ]


def label_selector_matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, "only matchLabels selectors are checked here"
    return all(labels.get(key) == value for key, value in selector.get("matchLabels", {}).items())


# --- PromQL -----------------------------------------------------------------------------------------


_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GRAFANA_VARIABLES = re.compile(r"\$\{[^}]*\}|\$\w+")
_LABEL_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w:.])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?")
_KEYWORDS = frozenset(
    {
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "and",
        "or",
        "unless",
        "offset",
        "atan2",
        "inf",
        "nan",
        "Inf",
        "NaN",
    }
)


PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "worker-dashboard.json"
# Series Prometheus makes itself for every target.
SCRAPE_SERIES = frozenset({"up"})


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text(encoding="utf-8"))["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def dashboard_queries() -> list[str]:
    """Every PromQL text of the dashboard: panel targets and template-variable queries."""
    board = dashboard()
    queries = [target["expr"] for panel in board["panels"] for target in panel.get("targets", [])]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            definition = variable["query"]["query"]
            assert definition.startswith("label_values(") and definition.endswith(")")
            selector, _, _label = definition.removeprefix("label_values(").removesuffix(")").rpartition(",")
            queries.append(selector)
    return queries


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers that are not functions, keywords or labels."""
    text = _STRINGS.sub('""', expr)
    text = _GRAFANA_VARIABLES.sub("", text)
    text = _LABEL_MATCHERS.sub("", text)
    text = _RANGES.sub("", text)
    text = _LABEL_LISTS.sub("", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        name, call = match.groups()
        if call or name in _KEYWORDS:
            continue
        names.add(name)
    return names


def grafana_variable_free(expr: str) -> str:
    """The expression with Grafana's variables replaced so that promtool can parse it."""
    return expr.replace("$__rate_interval", "5m").replace("$__interval", "1m").replace("$__range", "1h")


# --- promtool and other tools -----------------------------------------------------------------------


def promtool() -> str:
    """Path of promtool; fails (never skips) when it is missing."""
    candidates = [
        os.environ.get("WORKER_TEST_PROMTOOL"),
        shutil.which("promtool"),
        str(VENV_BIN / "promtool"),
    ]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise AssertionError(
        'promtool not found: run `eval "$(bash tests/services/promtool.sh)"` (tests/run.sh does)'
    )


def tini() -> str:
    """Path of tini, the images' PID 1; fails (never skips) when it is missing."""
    candidates = [os.environ.get("WORKER_TEST_TINI"), shutil.which("tini"), str(VENV_BIN / "tini")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise AssertionError('tini not found: run `eval "$(bash tests/services/tini.sh)"` (tests/run.sh does)')


def venv_tool(name: str, package: str) -> str:
    path = shutil.which(name, path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if path is None:
        raise AssertionError(f"{name} not found: pip install {package}")
    return path


def walk(value: Any) -> Iterator[Any]:
    """Every nested value of a JSON-like structure, the structure included."""
    yield value
    if isinstance(value, dict):
        for item in value.values():
            yield from walk(item)
    elif isinstance(value, list):
        for item in value:
            yield from walk(item)


# --- Dockerfiles ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dockerfile:
    """A parsed Dockerfile: its instructions in order, and ENV/ARG as they stand at the end."""

    path: Path
    instructions: list[tuple[str, str]]
    base_image: str
    env: dict[str, str]
    build_args: dict[str, str]

    @classmethod
    def load(cls, name: str) -> Dockerfile:
        import io

        from dockerfile_parse import DockerfileParser

        path = REPO / name
        parser = DockerfileParser(fileobj=io.BytesIO(path.read_bytes()))
        instructions = [
            (item["instruction"], item["value"])
            for item in parser.structure
            if item["instruction"] != "COMMENT"
        ]
        return cls(path, instructions, parser.baseimage, dict(parser.envs), dict(parser.args))

    def values(self, instruction: str) -> list[str]:
        return [value for name, value in self.instructions if name == instruction]

    def last(self, instruction: str) -> str:
        found = self.values(instruction)
        assert found, f"{self.path.name} has no {instruction}"
        return found[-1]

    def exec_form(self, instruction: str) -> list[str]:
        """The JSON (exec) form of ENTRYPOINT/CMD; shell form would put `sh -c` in front of the worker."""
        import json

        value = json.loads(self.last(instruction))
        assert isinstance(value, list) and all(isinstance(part, str) for part in value)
        return value

    def healthcheck(self) -> tuple[dict[str, str], list[str]]:
        """HEALTHCHECK options and its exec-form command."""
        import json

        options_text, _, command = self.last("HEALTHCHECK").partition(" CMD ")
        options = dict(option.removeprefix("--").split("=", 1) for option in options_text.split())
        return options, json.loads(command)

    def volumes(self) -> set[str]:
        import json

        found: set[str] = set()
        for value in self.values("VOLUME"):
            found.update(json.loads(value) if value.startswith("[") else value.split())
        return found

    def copies(self) -> list[tuple[list[str], str]]:
        """COPY instructions as (sources, destination), build arguments substituted by their defaults."""
        result = []
        for value in self.values("COPY"):
            parts = [part for part in value.split() if not part.startswith("--")]
            parts = [
                re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: self.build_args[m.group(1) or m.group(2)], part)
                for part in parts
            ]
            result.append((parts[:-1], parts[-1]))
        return result

    def user_id(self) -> int:
        user = self.last("USER").split(":")[0]
        assert user.isdigit(), f"{self.path.name}: USER {user!r} is not numeric"
        return int(user)


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Whether Docker leaves `path` out of the build context: the last matching pattern decides, and a
    pattern that matches a directory matches everything below it."""

    def matches(pattern: str) -> bool:
        regex = ""
        index = 0
        while index < len(pattern):
            if pattern.startswith("**/", index):
                regex += "(?:.*/)?"
                index += 3
            elif pattern.startswith("**", index):
                regex += ".*"
                index += 2
            elif pattern[index] == "*":
                regex += "[^/]*"
                index += 1
            elif pattern[index] == "?":
                regex += "[^/]"
                index += 1
            else:
                regex += re.escape(pattern[index])
                index += 1
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        return any(re.fullmatch(regex, prefix) for prefix in prefixes)

    excluded = False
    for raw in patterns:
        negated = raw.startswith("!")
        pattern = raw.removeprefix("!").strip("/")
        if matches(pattern):
            excluded = not negated
    return excluded


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
