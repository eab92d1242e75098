"""The ListingGuard gRPC face: CheckRequest ↔ Listing/GuardResult and the caller's deadline.

Errors, spans and request metrics are the process's StatusInterceptor's job (gateway/server.py).
"""

from __future__ import annotations

import time

import grpc

from meshserve.errors import InvalidInput
from meshserve.gateway.arms import SUBJECT, subject_from
from meshserve.gateway.listing_guard import GuardResult, Listing, ListingGuard
from meshserve.v1 import listing_guard_pb2, listing_guard_pb2_grpc


class ListingGuardServicer(listing_guard_pb2_grpc.ListingGuardServicer):
    def __init__(self, guard: ListingGuard, default_deadline_s: float = 10.0):
        self.guard = guard
        self.default_deadline_s = default_deadline_s

    async def Check(
        self, request: listing_guard_pb2.CheckRequest, context: grpc.aio.ServicerContext
    ) -> listing_guard_pb2.CheckResponse:
        remaining = context.time_remaining()
        # A caller without a deadline still gets one: no request may run unbounded.
        deadline = time.monotonic() + (self.default_deadline_s if remaining is None else remaining)
        SUBJECT.set(subject_from(context.invocation_metadata(), request.listing.listing_id))
        result = await self.guard.check(to_listing(request), tuple(request.models), deadline)
        return to_response(result)


def to_listing(request: listing_guard_pb2.CheckRequest) -> Listing:
    if not request.HasField("listing"):
        raise InvalidInput("listing: missing")
    given = request.listing
    return Listing(title=given.title, description=given.description, price_cents=given.price_cents,
                   category=given.category, attributes=dict(given.attributes), images=tuple(given.images),
                   listing_id=given.listing_id)  # fmt: skip


def to_response(result: GuardResult) -> listing_guard_pb2.CheckResponse:
    response = listing_guard_pb2.CheckResponse(
        partial=result.partial, flagged=result.decision.name != "ALLOW", trace_id=result.trace_id,
        decision=listing_guard_pb2.Decision.Name(int(result.decision)), policy_version=result.policy_version,
    )  # fmt: skip
    for v in result.verdicts:
        response.verdicts.add(model=v.model, version=v.version, score=v.score, flagged=v.flagged,
                              status=v.status.value, threshold=v.block_threshold, detail=v.detail,
                              review_threshold=v.review_threshold, label=v.label, latency_ms=v.latency_ms,
                              cached=v.cached, arm=v.arm)  # fmt: skip
    response.reasons.extend(result.reasons)
    response.versions.update(result.versions)
    for category, score in result.suggestions:
        response.suggestions.add(category=category, score=score)
    return response
