"""Why this node declines a request, in the domain's words.

Billing and capacity raise these; they know nothing of HTTP. `worker/gateway/errors.py` alone turns each
into its answer (status, OpenAI error body, `Retry-After`).
"""

from __future__ import annotations


class Refusal(Exception):
    """A request declined before any engine saw it. `retry_after_s`: whole seconds until trying again may
    succeed (None: retrying the same request will not help)."""

    def __init__(self, message: str, *, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class InvalidKey(Refusal):
    """No API key, or one that is unknown, revoked or expired."""


class ModelNotAllowed(Refusal):
    """The key may not use the requested model."""


class InsufficientBalance(Refusal):
    """The account cannot cover the request's worst-case cost."""


class SpendCapReached(Refusal):
    """The key's monthly spend cap cannot cover the request's worst-case cost."""


class RateLimited(Refusal):
    """The key's requests or tokens per minute are used up."""


class AtCapacity(Refusal):
    """Every replica of the model is full and the request may not wait (or would wait too long)."""


class ContextTooLong(Refusal):
    """The request certainly cannot fit the model's context; `param` names the field at fault."""

    def __init__(self, message: str, *, param: str) -> None:
        super().__init__(message)
        self.param = param


class Unavailable(Refusal):
    """The node cannot serve the model right now (no replica ready)."""


class Draining(Unavailable):
    """The node takes no new requests (maintenance or shutdown)."""


class BillingUnavailable(Unavailable):
    """The ledger's store cannot be reached: refused rather than served unbilled."""


class WorkerIdTakenOver(Unavailable):
    """Another worker now serves under this worker's id."""


class ClientDisconnected(Exception):
    """Not a refusal: the client went away before its request was bound to a replica (while it was queued, say).
    Nothing to answer, nothing sent."""
