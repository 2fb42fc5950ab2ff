"""Running the mock engine as its own process, the way the supervisor runs vLLM."""

from __future__ import annotations

import uvicorn

from worker.config import ModelConfig
from worker.engines.mock.app import build_mock_app


def run_mock_engine(model: ModelConfig, host: str, port: int) -> None:
    """Serves the mock engine until the process is told to stop (blocking)."""
    app = build_mock_app(model, kv_events_host=host)
    uvicorn.run(app, host=host, port=port, loop="uvloop", http="httptools", access_log=False,
                log_level="warning", workers=1, lifespan="on", timeout_graceful_shutdown=5)
