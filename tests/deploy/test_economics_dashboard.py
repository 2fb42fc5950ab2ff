"""The dashboard's "Workload economics" row: its panels, and what their queries compute from known series
(promtool evaluates them as recording rules over a synthetic hour of one busy and one idle model)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.deploy_support import dashboard, grafana_variable_free, promql_metric_names, promtool

ROW = "Workload economics"
BREAK_EVEN = "Break-even vs charged price per million tokens"


def economics_panels() -> dict[str, dict[str, Any]]:
    panels = dashboard()["panels"]
    (row,) = [index for index, panel in enumerate(panels) if panel["title"] == ROW]
    following = panels[row + 1:]
    end = next((i for i, panel in enumerate(following) if panel["type"] == "row"), len(following))
    return {panel["title"]: panel for panel in following[:end]}


def queries(panel: dict[str, Any]) -> dict[str, str]:
    """{legend: query} with every dashboard variable bound to all values."""
    return {target["legendFormat"].replace("{{model}}", "").strip() or "value":
            grafana_variable_free(target["expr"]).replace('"$instance"', '".*"').replace('"$model"', '".*"')
            for target in panel["targets"]}


def test_the_row_has_the_panels_an_operator_reads() -> None:
    panels = economics_panels()
    assert set(panels) == {"Revenue per hour", "GPU cost per hour", "Margin per hour", "GPU utilisation", BREAK_EVEN}
    uses = {title: set().union(*(promql_metric_names(q) for q in queries(panel).values()))
            for title, panel in panels.items()}
    # GPU cost is the GPUs held now times their price: idle GPUs cost as much as busy ones.
    assert uses["GPU cost per hour"] == {"worker_gpus_provisioned", "worker_gpu_hour_usd"}
    assert {"worker_gpu_seconds_attributed_total", "worker_replica_busy_gpu_seconds_total"} <= uses["GPU utilisation"]
    # NVML's utilisation of the GPUs the model holds, to cross-check the attributed time on GPU nodes.
    assert {"worker_gpu_utilization_ratio", "worker_replica_gpu_info"} <= uses["GPU utilisation"]
    assert {"worker_prompt_tokens_total", "worker_output_tokens_total"} <= uses[BREAK_EVEN]
    assert panels["GPU utilisation"]["fieldConfig"]["defaults"]["unit"] == "percentunit"


# Over 20 minutes, sampled each minute: model "busy" (2 GPUs at $2.50/h) earns $0.50 a minute, is attributed
# 60 GPU seconds a minute (busy 90) and serves 600,000 prompt and 60,000 completion tokens a minute; model
# "idle" holds 1 GPU at $2.50/h and has served nothing (so it has no revenue or token series at all). NVML
# sees GPUs 0 and 1 (busy's) at 60% and 80%, GPU 2 (idle's) at 0% and GPU 3 (held by no replica) at 50%.
SERIES = {
    'worker_revenue_usd_total{instance="w",model="busy"}': "0+0.5x20",
    'worker_gpu_seconds_attributed_total{instance="w",model="busy"}': "0+60x20",
    'worker_replica_busy_gpu_seconds_total{instance="w",model="busy",replica="busy-0"}': "0+90x20",
    'worker_prompt_tokens_total{instance="w",model="busy"}': "0+600000x20",
    'worker_output_tokens_total{instance="w",model="busy"}': "0+60000x20",
    'worker_gpus_provisioned{instance="w",model="busy"}': "2x20",
    'worker_gpu_hour_usd{instance="w",model="busy"}': "2.5x20",
    'worker_gpus_provisioned{instance="w",model="idle"}': "1x20",
    'worker_gpu_hour_usd{instance="w",model="idle"}': "2.5x20",
    'worker_gpu_utilization_ratio{instance="w",gpu="0",uuid="GPU-0"}': "0.6x20",
    'worker_gpu_utilization_ratio{instance="w",gpu="1",uuid="GPU-1"}': "0.8x20",
    'worker_gpu_utilization_ratio{instance="w",gpu="2",uuid="GPU-2"}': "0x20",
    'worker_gpu_utilization_ratio{instance="w",gpu="3",uuid="GPU-3"}': "0.5x20",
    'worker_replica_gpu_info{instance="w",model="busy",replica="busy-0",gpu="0"}': "1x20",
    'worker_replica_gpu_info{instance="w",model="busy",replica="busy-0",gpu="1"}': "1x20",
    'worker_replica_gpu_info{instance="w",model="idle",replica="idle-0",gpu="2"}': "1x20",
}
TOKENS_PER_HOUR = (600_000 + 60_000) * 60
# (panel, legend) -> {model: value}, computed by hand from SERIES.
EXPECTED = {
    ("Revenue per hour", "value"): {"busy": 0.5 * 60},
    ("GPU cost per hour", "value"): {"busy": 2 * 2.5, "idle": 2.5},
    ("Margin per hour", "value"): {"busy": 30 - 5.0, "idle": -2.5},
    ("GPU utilisation", "attributed"): {"busy": 60 / 60 / 2, "idle": 0.0},
    ("GPU utilisation", "busy"): {"busy": 90 / 60 / 2},
    ("GPU utilisation", "NVML utilisation (cross-check)"): {"busy": (0.6 + 0.8) / 2, "idle": 0.0},
    (BREAK_EVEN, "break-even"): {"busy": 5.0 / TOKENS_PER_HOUR * 1e6},
    (BREAK_EVEN, "charged"): {"busy": 30.0 / TOKENS_PER_HOUR * 1e6},
}


def test_the_queries_compute_revenue_cost_margin_utilisation_and_break_even(tmp_path: Path) -> None:
    panels = economics_panels()
    rules, tests = [], []
    for number, ((title, legend), by_model) in enumerate(EXPECTED.items()):
        record = f"economics:panel_{number}"
        rules.append({"record": record, "expr": queries(panels[title])[legend]})
        samples = [{"labels": f'{record}{{model="{model}"}}', "value": value} for model, value in by_model.items()]
        tests.append({"expr": record, "eval_time": "15m", "exp_samples": samples})
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": [{"name": "economics", "rules": rules}]}))
    (tmp_path / "test.yml").write_text(yaml.safe_dump({
        "rule_files": ["rules.yml"], "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": [{"series": s, "values": v} for s, v in SERIES.items()],
                   "promql_expr_test": tests}],
    }))
    result = subprocess.run([promtool(), "test", "rules", "test.yml"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
