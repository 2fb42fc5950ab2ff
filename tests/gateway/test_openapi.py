"""The OpenAPI document of the inference routes: request bodies from the request models, OpenAI errors."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import schemathesis

from tests.support.worker_process import fast_mock_model
from worker.config.loader import parse_node_config
from worker.gateway.app import INFERENCE_ROUTES, create_app
from worker.gateway.gateway import Gateway
from worker.gateway.requests import REQUEST_SCHEMAS

CHAT = "acme/chat"
EMBED = "acme/embed"
ERROR_STATUSES = ("400", "401", "402", "403", "404", "413", "429", "503")


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    config = parse_node_config({"worker": {"id": "w"},
                                "models": [fast_mock_model(CHAT), fast_mock_model(EMBED, task="embed")]})
    app = create_app(Gateway(config, leaser=None, hooks=[]),  # type: ignore[arg-type]  # never served
                     models_listing=dict, readiness=lambda: (True, {}))
    return app.openapi()


def body_schema(document: dict[str, Any], path: str) -> dict[str, Any]:
    return document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]


@pytest.mark.parametrize(("path", "endpoint"), INFERENCE_ROUTES.items())
def test_request_body_is_the_request_model_with_this_nodes_models(
    document: dict[str, Any], path: str, endpoint: str
) -> None:
    schema = body_schema(document, path)
    model_schema = REQUEST_SCHEMAS[endpoint].model_json_schema()
    assert document["paths"][path]["post"]["requestBody"]["required"] is True
    assert schema["required"] == model_schema["required"]
    assert set(schema["properties"]) == set(model_schema["properties"])
    assert schema["properties"]["model"]["enum"] == ([EMBED] if endpoint == "embeddings" else [CHAT])
    # pydantic's own references mean nothing inside an OpenAPI document: everything is inlined.
    assert b"$defs" not in orjson.dumps(schema)


@pytest.mark.parametrize("path", INFERENCE_ROUTES)
def test_every_refusal_is_documented_in_openais_error_shape(document: dict[str, Any], path: str) -> None:
    responses = document["paths"][path]["post"]["responses"]
    for status in ERROR_STATUSES:
        assert responses[status]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorResponse"}
    error = document["components"]["schemas"]["ErrorDetail"]
    assert set(error["required"]) == {"message", "type", "param", "code"}
    success = responses["200"]["content"]
    assert "application/json" in success
    assert ("text/event-stream" in success) is (path != "/v1/embeddings")


def test_chat_messages_are_documented_with_a_role(document: dict[str, Any]) -> None:
    message = body_schema(document, "/v1/chat/completions")["properties"]["messages"]["items"]
    assert message["required"] == ["role"]
    assert "user" in message["properties"]["role"]["enum"]


def test_a_fuzzer_can_load_every_inference_operation(document: dict[str, Any]) -> None:
    schema = schemathesis.openapi.from_dict(document)
    for path in INFERENCE_ROUTES:
        operation = schema[path]["POST"]  # raises on a document it cannot read
        assert operation.body, f"{path} documents no request body"
