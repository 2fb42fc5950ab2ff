"""Which replica with room takes a request when it is bound: where its prefix is cached, within reason.

Replicas are not interchangeable once they have served a conversation: the one that holds the longest
prefix of a prompt skips that much prefill. Cache-aware placement prefers it (or the replica that served
the client's session last) unless its load exceeds the least-loaded candidate's by `load_margin`; then
load wins, so a hot prefix cannot pile every request onto one replica.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any

from worker.config.models import RoutingConfig

if TYPE_CHECKING:
    from worker.capacity.prefix_index import PrefixIndex, PromptKey, SessionAffinity
    from worker.capacity.routing import ReplicaRouter
    from worker.capacity.watchdog import ReplicaWatch
    from worker.engines.replica import Replica
    from worker.gateway.context import RequestContext


class Placement:
    def __init__(self, routing: RoutingConfig, replicas: Sequence[Replica]) -> None:
        self.routing = routing
        self.index: PrefixIndex | None = None
        self.sessions: SessionAffinity | None = None
        if routing.policy == "cache_aware":
            from worker.capacity.prefix_index import SessionAffinity, build_prefix_index

            self.index = build_prefix_index(replicas)
            self.sessions = SessionAffinity()
        self._turn = itertools.count()

    def prompt_key(self, ctx: RequestContext) -> PromptKey | None:
        """The request's key in the prefix index (None without one), to compute once per request."""
        return None if self.index is None else self.index.keys(ctx.endpoint, ctx.body)

    def worth_waiting_for(self, ctx: RequestContext, key: PromptKey | None, replica_ids: Sequence[str],
                          with_room: Collection[str]) -> frozenset[str]:
        """The full replicas among `replica_ids` worth waiting for rather than binding to one in
        `with_room`: the one that served the client's session last, else those holding the longest cached
        prefix of the prompt, when no replica with room holds at least half of that prefix (recomputing a
        short rest costs less than waiting for a slot). Empty when a replica with room serves it as well."""
        if self.index is None or key is None:
            return frozenset()
        if self.sessions is not None and ctx.session_key:
            replica_id = self.sessions.replica_of(ctx.session_key)
            if replica_id is not None and replica_id in replica_ids:
                return frozenset() if replica_id in with_room else frozenset((replica_id,))
        matches = {replica_id: self.index.match(replica_id, key) for replica_id in replica_ids}
        best = max(matches.values(), default=0)
        best_with_room = max((matches[r] for r in with_room if r in matches), default=0)
        if best == 0 or 2 * best_with_room >= best:
            return frozenset()
        return frozenset(r for r, matched in matches.items() if matched == best)

    def choose(self, ctx: RequestContext, candidates: Sequence[tuple[float, ReplicaWatch]],
               router: ReplicaRouter, key: PromptKey | None = None) -> ReplicaWatch:
        """One of `candidates` (load score, watch), every one of which has room. `key`: the request's
        prompt key when the caller already computed it (`prompt_key`)."""
        policy = self.routing.policy
        if policy == "round_robin":
            return candidates[next(self._turn) % len(candidates)][1]
        least_loaded = router.choose(candidates)
        assert least_loaded is not None
        if policy == "least_loaded" or self.index is None:
            return least_loaded
        least_score = min(score for score, _ in candidates)
        within_margin = [(score, watch) for score, watch in candidates
                         if score - least_score <= self.routing.load_margin]
        chosen = self._sticky(ctx, within_margin) or least_loaded
        if key is None:
            key = self.index.keys(ctx.endpoint, ctx.body)
        if chosen is least_loaded:
            matched = [(self.index.match(watch.replica.replica_id, key), -score, watch)
                       for score, watch in within_margin]
            best_match, _, best = max(matched, key=lambda item: (item[0], item[1]))
            if best_match > 0:
                chosen = best
        self.index.record(chosen.replica.replica_id, key)
        if self.sessions is not None and ctx.session_key:
            self.sessions.remember(ctx.session_key, chosen.replica.replica_id)
        return chosen

    def _sticky(self, ctx: RequestContext, candidates: Sequence[tuple[float, ReplicaWatch]]) -> ReplicaWatch | None:
        """The replica that served the client's session last, if it is among `candidates`."""
        if self.sessions is None or not ctx.session_key:
            return None
        replica_id = self.sessions.replica_of(ctx.session_key)
        return next((watch for _, watch in candidates if watch.replica.replica_id == replica_id), None)

    def forget(self, replica_id: str) -> None:
        """The replica restarted: whatever it cached is gone."""
        if self.index is not None:
            self.index.forget(replica_id)

    def describe(self) -> dict[str, Any]:
        return {"policy": self.routing.policy}
