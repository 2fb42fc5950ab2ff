"""`worker economics` (table, JSON, CSV, the plot) and `GET /admin/economics`, on SQLite and PostgreSQL."""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml
from matplotlib.image import imread

from tests.billing.support import provenance_for
from tests.economics.support import SINCE, UNTIL, node_config, write_window
from tests.economics.test_uptime import Clock, replica
from worker.billing.service import BillingService
from worker.billing.store import LedgerStore
from worker.billing.store.records import to_epoch
from worker.cli import economics
from worker.config import Settings
from worker.economics.compute import Economics
from worker.economics.plot import build_figure
from worker.economics.report import economics_timeline
from worker.economics.uptime import UptimeRecorder
from worker.node import WorkerNode

ADMIN_TOKEN = "admin-token-for-tests-0123456789abcdef"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
WINDOW = ("--since", SINCE.isoformat(), "--until", UNTIL.isoformat())


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(node_config().model_dump(mode="json", exclude_defaults=True)))
    return path


def cli(db_url: str, config_file: Path, *argv: str) -> int:
    parser = argparse.ArgumentParser(prog="worker")
    economics.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["economics", "--db-url", db_url, "--config", str(config_file), *argv])
    code: int = args.handler(args)
    return code


async def cli_output(capsys: pytest.CaptureFixture[str], *argv: Any) -> tuple[int, str, str]:
    code = await asyncio.to_thread(cli, *argv)  # the command runs its own event loop
    captured = capsys.readouterr()
    return code, captured.out, captured.err


async def test_the_cli_prints_json_csv_and_a_table(
    store: LedgerStore, db_url: str, config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await write_window(store)
    code, out, _ = await cli_output(capsys, db_url, config_file, *WINDOW, "--format", "json",
                                    "--target-margin", "0.25")
    assert code == 0
    report = orjson.loads(out)
    assert set(report) == {"object", "since", "until", "worker_id", "target_margin", "models", "node"}
    assert [m["model"] for m in report["models"]] == ["acme/big", "acme/chat"]
    assert set(report["node"]) == set(Economics.model_fields)
    assert (report["node"]["revenue_usd"], report["node"]["gpu_cost_usd"]) == ("0.030000", "7.500000")

    code, out, _ = await cli_output(capsys, db_url, config_file, *WINDOW, "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert tuple(rows[0]) == tuple(Economics.model_fields)
    assert [(r["model"], r["revenue_usd"], r["utilization"]) for r in rows] == [
        ("acme/big", "0.020000", "0.004167"), ("acme/chat", "0.010000", "0.001852"), ("*", "0.030000", "0.003535")]

    code, out, _ = await cli_output(capsys, db_url, config_file, *WINDOW, "--model", "acme/chat")
    lines = out.splitlines()
    assert lines[0] == "2026-11-10 00:00:00 to 2026-11-10 01:00:00 UTC"
    assert lines[1].split() == ["acme/chat", "node"]
    assert lines[lines.index(next(line for line in lines if line.startswith("gpu_cost_usd")))].split() == [
        "gpu_cost_usd", "1.500000", "1.500000"]
    assert not any(line.startswith("target_") for line in lines)


@pytest.mark.parametrize(("argv", "message"), [
    (("--since", "yesterday"), "--since: not an ISO 8601 date or time"),
    (("--since", "2026-11-10", "--until", "2026-11-10"), "--since: 2026-11-10T00:00:00+00:00 is not before until"),
    (("--target-margin", "1"), "--target-margin: must be at least 0 and below 1"),
    (("--target-margin", "-0.1"), "--target-margin: must be at least 0 and below 1"),
])
async def test_the_cli_refuses_bad_options_naming_them(
    db_url: str, config_file: Path, capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], message: str
) -> None:
    code, out, err = await cli_output(capsys, db_url, config_file, *argv)
    assert (code, out) == (2, "")
    assert message in err


async def test_the_plot_is_a_png_of_revenue_cost_and_utilisation(
    store: LedgerStore, db_url: str, config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await write_window(store)
    models, points = await economics_timeline(store, node_config(), SINCE, UNTIL)
    assert (points[0].start, points[-1].end) == (to_epoch(SINCE), to_epoch(UNTIL))
    assert all(a.end == b.start for a, b in pairwise(points)) and len(points) == 60  # minutes
    assert sum(p.revenue_usd for p in points) == pytest.approx(0.03)
    assert sum(p.gpu_cost_usd for p in points) == pytest.approx(7.5)
    figure = build_figure(models, points, SINCE, UNTIL)
    money, usage = figure.axes
    assert [line.get_label() for line in money.get_lines()] == ["revenue", "GPU cost"]
    revenue = money.get_lines()[0].get_ydata()
    assert (revenue[0], revenue[-1]) == (0.0, pytest.approx(0.03))  # cumulative, from 0 at the window's start
    assert [line.get_label() for line in usage.get_lines()] == ["acme/big", "acme/chat"]
    assert "2026-11-10 00:00:00 to 2026-11-10 01:00:00 UTC" in figure.get_suptitle()
    assert money.get_ylabel() == "cumulative USD" and usage.get_xlabel() == "time (UTC)"

    png = tmp_path / "economics.png"
    code, _, err = await cli_output(capsys, db_url, config_file, *WINDOW, "--plot", str(png))
    assert code == 0 and f"plot written to {png}" in err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert imread(png).shape[:2] == (825, 1210)  # 11 x 7.5 inches at 110 dpi


@pytest.fixture
async def node(store: LedgerStore, tmp_path: Path) -> WorkerNode:
    settings = Settings(auth=True, db_url=f"sqlite:///{tmp_path / 'unused.db'}", admin_token=ADMIN_TOKEN)
    worker = WorkerNode(node_config(), settings, gpu_count=0)
    worker.mount_billing_routes(
        BillingService(store=store, worker_id="node-1", auth_required=True, provenance=provenance_for))
    return worker


def client_for(node: WorkerNode) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=node.app), base_url="http://worker")


async def test_the_admin_endpoint_answers_the_clis_json(
    node: WorkerNode, store: LedgerStore, db_url: str, config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await write_window(store)
    params = {"since": SINCE.isoformat(), "until": UNTIL.isoformat(), "target_margin": "0.25"}
    async with client_for(node) as client:
        assert (await client.get("/admin/economics", params=params)).status_code == 401
        wrong = await client.get("/admin/economics", params=params, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        response = await client.get("/admin/economics", params=params, headers=ADMIN)
        assert response.status_code == 200, response.text
        one = await client.get("/admin/economics", params={**params, "model": "acme/big"}, headers=ADMIN)
    _, out, _ = await cli_output(capsys, db_url, config_file, *WINDOW, "--format", "json", "--target-margin", "0.25")
    assert response.json() == orjson.loads(out)
    assert [m["model"] for m in one.json()["models"]] == ["acme/big"]


@pytest.mark.parametrize(("params", "param"), [
    ({"since": "last week"}, "since"),
    ({"until": "2026-13-01"}, "until"),
    ({"since": "2026-11-02", "until": "2026-11-01"}, "since"),
    ({"target_margin": "1.5"}, "target_margin"),
    ({"target_margin": "NaN"}, "target_margin"),
    ({"model": "x" * 300}, "model"),
])
async def test_bad_admin_parameters_are_400s_naming_them(
    node: WorkerNode, params: dict[str, str], param: str
) -> None:
    async with client_for(node) as client:
        response = await client.get("/admin/economics", params=params, headers=ADMIN)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)


async def test_the_admin_endpoint_counts_the_running_replicas_up_to_now(node: WorkerNode, store: LedgerStore) -> None:
    clock, chat = Clock(to_epoch(SINCE)), replica()
    node.uptime = UptimeRecorder(store, "node-1", [chat], asyncio.Event, clock=clock)
    node.uptime.observe()
    await node.uptime.save()
    clock.now += 1800  # no heartbeat since the start: the report renews it
    params = {"since": SINCE.isoformat(), "until": UNTIL.isoformat()}
    async with client_for(node) as client:
        response = await client.get("/admin/economics", params=params, headers=ADMIN)
    chat_row = next(m for m in response.json()["models"] if m["model"] == "acme/chat")
    assert chat_row["gpu_hours_provisioned"] == 1.0  # half an hour on 2 GPUs
