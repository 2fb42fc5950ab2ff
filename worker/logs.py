"""JSON-lines logging: one object per line with the fields passed in `extra` (request id, replica, ...)."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

# Attributes every LogRecord has; anything else came from `extra=` and belongs in the JSON object.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
# Never let these reach a log line, whatever a caller passes.
_SECRET_KEYS = frozenset({"authorization", "api_key", "key", "token", "admin_token", "password", "secret"})


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = "[redacted]" if key.lower() in _SECRET_KEYS else value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class ClientErrorsAtInfo(logging.Filter):
    """uvicorn logs a request it cannot parse (malformed request line or headers) as a warning: the client's
    mistake, not the worker's, so it is logged at info like the other client errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING and record.getMessage().startswith("Invalid HTTP request"):
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def configure_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's own handlers print plain text; route its records through ours instead.
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per engine call is noise
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    uvicorn_errors = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, ClientErrorsAtInfo) for f in uvicorn_errors.filters):
        uvicorn_errors.addFilter(ClientErrorsAtInfo())
