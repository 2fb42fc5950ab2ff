"""deploy/prometheus and deploy/grafana: promtool accepts them; they query only exported metrics."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy import deploy_support
from tests.deploy.deploy_support import (
    DASHBOARD,
    EXPORTED_SERIES,
    KUBERNETES,
    PROMETHEUS,
    SCRAPE_SERIES,
    alert_rules,
    dashboard,
    dashboard_queries,
    grafana_variable_free,
    load_documents,
    node_shapes,
    promql_metric_names,
    promtool,
    walk,
)

ALERT_TESTS = Path(__file__).parent / "prometheus" / "alerts_test.yml"


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], check=False, capture_output=True, text=True, timeout=120)


# --- promtool ---------------------------------------------------------------------------------------


def test_prometheus_config_is_valid(tmp_path: Path) -> None:
    # As deployed: with the metrics token file the scrape jobs read, which promtool checks exists.
    deployed = tmp_path / "prometheus"
    shutil.copytree(PROMETHEUS, deployed)
    (deployed / "secrets" / "worker-metrics-token").write_text("0123456789abcdef" * 4 + "\n")
    result = run_promtool("check", "config", str(deployed / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in result.stdout + result.stderr
    # Without the file, promtool (and Prometheus) refuse it: the credential is really read from there.
    (deployed / "secrets" / "worker-metrics-token").unlink()
    result = run_promtool("check", "config", str(deployed / "prometheus.yml"))
    assert result.returncode != 0 and "worker-metrics-token" in result.stdout + result.stderr


def test_every_scrape_job_sends_the_metrics_token() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text(encoding="utf-8"))
    jobs = config["scrape_configs"]
    assert {job["job_name"] for job in jobs} == {"worker", "worker-public"}
    for job in jobs:
        assert job["authorization"] == {"type": "Bearer", "credentials_file": "secrets/worker-metrics-token"}
    # The token file itself never enters the repository.
    ignored = (PROMETHEUS / "secrets" / ".gitignore").read_text(encoding="utf-8").splitlines()
    assert "*" in ignored


def test_pod_monitor_sends_the_token_the_pods_require() -> None:
    (monitor,) = load_documents(KUBERNETES / "monitoring" / "podmonitor.yaml")
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    credentials = endpoint["authorization"]["credentials"]
    (secret,) = load_documents(KUBERNETES / "secret.example.yaml")
    assert endpoint["authorization"]["type"] == "Bearer"
    assert credentials["name"] == secret["metadata"]["name"] and credentials["key"] in secret["stringData"]
    for shape in node_shapes():
        env = {item["name"]: item for item in shape.container["env"]}
        reference = env["WORKER_METRICS_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert (reference["name"], reference["key"]) == (credentials["name"], credentials["key"]), shape


def test_alert_rules_are_valid() -> None:
    result = run_promtool("check", "rules", str(PROMETHEUS / "alerts.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rule_unit_tests_pass() -> None:
    result = run_promtool("test", "rules", str(ALERT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_unit_tests_cover_several_alerts() -> None:
    tests = yaml.safe_load(ALERT_TESTS.read_text(encoding="utf-8"))["tests"]
    tested = {case["alertname"] for test in tests for case in test["alert_rule_test"] if case["exp_alerts"]}
    assert {
        "WorkerGpuFailed",
        "WorkerReplicaCrashLooping",
        "WorkerNotReady",
        "WorkerAdmissionRejections",
    } <= tested
    assert tested <= {rule["alert"] for rule in alert_rules()}


def test_promtool_catches_a_broken_rule(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yml"
    broken.write_text("groups:\n  - name: x\n    rules:\n      - alert: X\n        expr: sum(rate(x[5m])\n")
    assert run_promtool("check", "rules", str(broken)).returncode != 0


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    rules = [
        {"record": f"dashboard:query_{i}", "expr": grafana_variable_free(query)}
        for i, query in enumerate(dashboard_queries())
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8")
    result = run_promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


# --- Metric names -----------------------------------------------------------------------------------


def test_metric_name_extraction() -> None:
    assert promql_metric_names('sum by (le, model) (rate(a_bucket{model=~"$model"}[$__rate_interval]))') == {
        "a_bucket"
    }
    assert promql_metric_names("a / on (x) group_left (y) b offset 5m > 1e-9 and vllm:c") == {
        "a",
        "b",
        "vllm:c",
    }
    assert promql_metric_names('histogram_quantile(0.99, x{s="sum(y)"}) or floor(z / 8) % 2 == 1') == {
        "x",
        "z",
    }


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: rule["alert"])
def test_alerts_use_exported_metrics_and_say_what_happened(rule: dict[str, Any]) -> None:
    names = promql_metric_names(rule["expr"])
    assert names, rule["expr"]
    assert names <= EXPORTED_SERIES | SCRAPE_SERIES, names - EXPORTED_SERIES - SCRAPE_SERIES
    assert rule["labels"]["severity"] in {"critical", "warning"}
    assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_alerts_cover_the_failure_modes() -> None:
    by_metric: dict[str, set[str]] = {}
    for rule in alert_rules():
        for name in promql_metric_names(rule["expr"]):
            by_metric.setdefault(name, set()).add(rule["alert"])
    for metric in [
        "worker_replica_state",
        "worker_replica_restarts_total",
        "worker_gpu_xid_events_total",
        "worker_gpu_health",
        "worker_admission_rejections_total",
        "vllm:num_requests_waiting",
        "worker_ready",
        "worker_ledger_backlog",
        "worker_outbox_backlog",
    ]:
        assert metric in by_metric, f"no alert on {metric}"


def test_dashboard_uses_exported_metrics_only() -> None:
    for query in dashboard_queries():
        names = promql_metric_names(query)
        assert names, query
        assert names <= EXPORTED_SERIES, f"{query}: {names - EXPORTED_SERIES}"


def test_dashboard_shows_what_operators_need() -> None:
    used = set().union(*(promql_metric_names(query) for query in dashboard_queries()))
    for metric in [
        "worker_requests_total",
        "worker_request_ttft_seconds_bucket",
        "worker_request_inter_token_seconds_bucket",
        "worker_admission_rejections_total",
        "worker_replica_state",
        "vllm:kv_cache_usage_perc",
        "vllm:num_requests_waiting",
        "worker_gpu_temperature_celsius",
        "worker_gpu_power_watts",
        "worker_gpu_utilization_ratio",
        "worker_gpu_health",
        "worker_ledger_backlog",
    ]:
        assert metric in used, f"the dashboard does not show {metric}"
    queries = " ".join(dashboard_queries())
    assert "histogram_quantile(0.5," in queries and "histogram_quantile(0.99," in queries
    assert "sum by (status)" in queries


# --- Dashboard structure ----------------------------------------------------------------------------


def test_dashboard_is_importable_json() -> None:
    board = dashboard()
    assert board["uid"] and board["title"] and isinstance(board["schemaVersion"], int)
    panels = board["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        for target in panel.get("targets", []):
            assert target["refId"] and target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


def test_dashboard_variables_are_defined() -> None:
    board = dashboard()
    defined = {variable["name"] for variable in board["templating"]["list"]}
    assert {"datasource", "instance", "model"} <= defined
    text = DASHBOARD.read_text(encoding="utf-8")
    used = set(re.findall(r"\$\{?(\w+)", text)) - {"__rate_interval", "__interval", "__range", "__all"}
    assert used <= defined, used - defined


def test_no_panel_queries_a_datasource_by_fixed_uid() -> None:
    for value in walk(dashboard()):
        if isinstance(value, dict) and value.get("type") == "prometheus" and "uid" in value:
            assert value["uid"] == "${datasource}"


def test_missing_promtool_fails_instead_of_skipping(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WORKER_TEST_PROMTOOL", str(tmp_path / "absent"))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(deploy_support, "VENV_BIN", tmp_path)
    with pytest.raises(AssertionError, match=r"tests/services/promtool\.sh"):
        deploy_support.promtool()
