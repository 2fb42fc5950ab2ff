"""Session fixtures shared by every test area."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.tiny_model import make_tiny_embedding_model, make_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Llama chat model (tokenizer with chat template), built once per run."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-chat-model"))


@pytest.fixture(scope="session")
def tiny_embedding_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight BERT encoder for /v1/embeddings, built once per run."""
    return make_tiny_embedding_model(tmp_path_factory.mktemp("tiny-embedding-model"))
