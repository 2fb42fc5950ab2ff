"""Errors in vLLM's shape: `{"error": {"message", "type", "param", "code": <HTTP status as int>}}`."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

import orjson
from starlette.responses import Response


class EngineError(Exception):
    """A request the mock engine refuses, answered the way vLLM answers it."""

    def __init__(self, message: str, status: int = 400, error_type: str = "BadRequestError",
                 param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.error_type = error_type
        self.param = param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param,
                          "code": self.status}}

    def response(self) -> Response:
        return Response(orjson.dumps(self.body()), status_code=self.status, media_type="application/json")


def validation_error(errors: list[Any]) -> EngineError:
    """vLLM's answer to a body that does not validate: every error listed, `param` from the first."""
    count = len(errors)
    label = "error" if count == 1 else "errors"
    lines = []
    for error in errors[:10]:
        shown = {key: value for key, value in error.items() if key in ("type", "loc", "msg", "input")}
        if "loc" in shown:
            shown["loc"] = ".".join(str(part) for part in shown["loc"])
        lines.append(f"  {shown}")
    param = None
    if errors and errors[0].get("loc"):
        param = ".".join(str(part) for part in errors[0]["loc"])
    message = f"{count} validation {label}:\n" + "\n".join(lines)
    return EngineError(message, HTTPStatus.BAD_REQUEST, HTTPStatus.BAD_REQUEST.phrase, param)


def model_not_found(requested: str, served: str) -> EngineError:
    return EngineError(f"The model `{requested}` does not exist. Valid aliases: {served}.",
                       HTTPStatus.NOT_FOUND, "NotFoundError", "model")


def engine_failed() -> EngineError:
    return EngineError("EngineCore encountered an issue. See stack trace (above) for the root cause.",
                       HTTPStatus.INTERNAL_SERVER_ERROR, "InternalServerError")


def generation_failed() -> EngineError:
    """What vLLM answers when a request fails inside the engine (finish_reason "error")."""
    return EngineError("Internal server error", HTTPStatus.INTERNAL_SERVER_ERROR, "InternalServerError")
