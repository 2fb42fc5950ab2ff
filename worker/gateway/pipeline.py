"""The stages of one inference request, in order, and the hooks that other packages plug into them.

    1. parse and validate   requests.py: read the body (size-capped), check it for its endpoint; the model
                            must be served here (Gateway.request_context)
    2. authenticate         hooks' `before_request`, in the order of `request_hooks` below: provenance
    3. reserve              headers, then billing (key, model allowed, rate limits, balance hold)
    4. admit / queue        the Leaser: a replica's lease now, or after waiting in the model's fair queue
                            (capacity/leasing.py, capacity/admission.py)
    5. dispatch             the body to the leased replica's engine (Gateway.dispatch, relay.open_upstream);
                            a replica that cannot take it is swapped for a sibling before any byte is sent
    6. relay                the answer back: whole (Gateway) or as a stream (relay.RelayStreamResponse);
                            hooks' `after_route` once the replica is known, `usage_extras` once the usage is
    7. settle and record    the request's GPU time (`settle_gpu_seconds`), then hooks' `finalize`, exactly
                            once, through the request's `HookChain`
    8. release              the lease, whatever happened (gateway.RequestTicket.close)

Every refusal on the way is a `worker.refusals.Refusal` (billing, capacity) or an `ApiError` (the gateway's
own); `errors.py` turns refusals into answers, and the ticket records them like any other end.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from worker.config import EngineKind
from worker.gateway.context import RequestContext, RequestView
from worker.gateway.hooks import RequestHooks
from worker.gateway.prompt_count import complete_usage

__all__ = ["HookChain", "RequestView", "request_hooks"]

logger = logging.getLogger(__name__)


def request_hooks(*, metrics: RequestHooks, access_log: RequestHooks, disclosure: RequestHooks,
                  billing: RequestHooks | None) -> list[RequestHooks]:
    """The hooks every inference request runs, in their one order.

    Metrics and the access log come first so that they see every refusal of the later hooks; disclosure
    sets the provenance headers before billing can refuse (refusals say which worker refused); billing
    (absent with the ledger off) is last, so nothing after it can refuse a request it already holds money for.
    """
    return [metrics, access_log, disclosure, *([billing] if billing is not None else [])]


def settle_gpu_seconds(ctx: RequestContext, at: float) -> None:
    """`ctx.gpu_seconds` once the request is over: the engine's own figure when it reported one, else the
    estimate of the request's share of its replica's busy time, else 0.0 (it never held a replica, or its
    engine is external: the node provisions no GPU for it). A relay process leaves it to the worker
    process, which meters its replicas."""
    timer = ctx.gpu_timer
    estimate = timer.settle(at) if timer is not None else None
    if ctx.gpu_seconds is not None:
        ctx.gpu_seconds_source = "engine"
    elif ctx.model.engine is EngineKind.external:
        ctx.gpu_seconds, ctx.gpu_seconds_source = 0.0, "none"
    elif estimate is not None:
        ctx.gpu_seconds = estimate * ctx.model.gpus_per_replica
        ctx.gpu_seconds_source = "estimate"
    elif timer is None:
        ctx.gpu_seconds, ctx.gpu_seconds_source = 0.0, "none"


class HookChain:
    """One request's way through the hooks: which of them admitted it, its usage extras, and its finalize,
    run exactly once whatever path the request ends on.

    Only hooks whose `before_request` passed (`admitted`) see the rest of the request: a hook that refused
    it, and those after it, never held anything for it.
    """

    __slots__ = ("_extras", "_task", "ctx", "done", "hooks", "passed")

    def __init__(self, ctx: RequestContext, hooks: Sequence[RequestHooks]) -> None:
        self.ctx = ctx
        self.hooks = hooks
        self.passed = 0
        self.done = False
        self._extras: dict[str, Any] | None = None
        self._task: asyncio.Future[None] | None = None

    @property
    def admitted(self) -> Sequence[RequestHooks]:
        return self.hooks if self.passed == len(self.hooks) else self.hooks[:self.passed]

    async def check_in(self, request: RequestView) -> None:
        """Stages 2 and 3: every hook's `before_request`, in order; raises the first refusal."""
        for hook in self.hooks[self.passed:]:
            await hook.before_request(self.ctx, request)
            self.passed += 1

    def routed(self) -> None:
        """The serving replica is known (`ctx.replica`): the hooks add their headers for it."""
        for hook in self.admitted:
            hook.after_route(self.ctx)

    def usage_extras(self) -> dict[str, Any]:
        """What the hooks add to the client's `usage` object (e.g. `cost`), computed once per request, when
        its usage is known; kept in `ctx.usage_extras`."""
        if self._extras is None:
            extras: dict[str, Any] = {}
            for hook in self.admitted:
                extras.update(hook.usage_extras(self.ctx))
            self._extras = self.ctx.usage_extras = extras
        return self._extras

    async def __call__(self) -> None:
        """Stage 7, awaited (before an answer's last byte). Shielded: a client that disconnects
        mid-finalize must not cut the ledger write short."""
        await asyncio.shield(self.start())

    def start(self, finished_monotonic: float | None = None) -> asyncio.Future[None]:
        """Stage 7 without waiting for it (for answers that need not wait, like refusals)."""
        if self._task is None:
            self.done = True
            self.ctx.finished_monotonic = finished_monotonic or time.monotonic()
            settle_gpu_seconds(self.ctx, self.ctx.finished_monotonic)
            self._task = asyncio.ensure_future(self._run())
        return self._task

    async def _run(self) -> None:
        ctx = self.ctx
        try:
            await complete_usage(ctx)
        except Exception:  # the record is written without the count rather than not at all
            logger.exception("cannot complete the usage of an abandoned request", extra={"request_id": ctx.request_id})
        for hook in self.admitted:
            try:
                await hook.finalize(ctx)
            except Exception:  # one failing hook must not stop the others (the ledger above all)
                logger.exception("finalize hook failed", extra={"request_id": ctx.request_id})
