"""CPU mock engine: vLLM's OpenAI HTTP API over a simulated continuous-batching scheduler.

It lets the whole worker run and be tested without a GPU; the gateway relays to it over HTTP exactly as
it would to vLLM.
"""

from worker.engines.mock.app import build_mock_app
from worker.engines.mock.server import run_mock_engine

__all__ = ["build_mock_app", "run_mock_engine"]
