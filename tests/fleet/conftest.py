"""A fleet of workers behind LiteLLM's Router, the open-source router these tests hold the worker to."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest

# LiteLLM downloads its model price map when first imported unless told to use the copy it ships;
# tests never reach the internet. Set here, before any test module imports litellm.
os.environ.setdefault("LITELLM_OFFLINE_MODE", "true")


@pytest.fixture(autouse=True)
async def close_litellm_clients() -> AsyncIterator[None]:
    """LiteLLM caches an HTTP client per event loop; close them before the test's loop goes away."""
    yield
    import litellm

    await litellm.close_litellm_async_clients()
