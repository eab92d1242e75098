"""The client of ListingGuard: one Check with a deadline, and its result as plain JSON."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import grpc

from meshserve.registry.config import SERVICE_NAMES
from meshserve.rpc import tls
from meshserve.rpc.tls_files import client_files
from meshserve.v1 import listing_guard_pb2, listing_guard_pb2_grpc


class CheckFailed(Exception):
    """The gateway refused or failed the check; the message names the status and why."""


def check_request(title: str, description: str = "", price_cents: int = 0, category: str = "",
                  attributes: Mapping[str, str] | None = None, photos: Sequence[bytes] = (),
                  models: Sequence[str] = ()) -> listing_guard_pb2.CheckRequest:  # fmt: skip
    listing = listing_guard_pb2.Listing(title=title, description=description, price_cents=price_cents,
                                        category=category, attributes=dict(attributes or {}), images=list(photos))
    return listing_guard_pb2.CheckRequest(listing=listing, models=list(models))


def check_listing(target: str, request: listing_guard_pb2.CheckRequest,
                  timeout: float = 10.0) -> listing_guard_pb2.CheckResponse:  # fmt: skip
    options = [("grpc.max_send_message_length", 64 * 1024 * 1024)]
    with tls.channel(target, SERVICE_NAMES["gateway"], options, client_files()) as channel:
        try:
            return listing_guard_pb2_grpc.ListingGuardStub(channel).Check(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise CheckFailed(f"{exc.code().name}: {exc.details()}") from None


def _name(enum: Any, value: int, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix).lower()


def check_json(response: listing_guard_pb2.CheckResponse) -> dict[str, Any]:
    """What `meshserve guard check --json` prints."""
    return {
        "decision": _name(listing_guard_pb2.Decision, response.decision, "DECISION_"),
        "partial": response.partial,
        "flagged": response.flagged,
        "reasons": list(response.reasons),
        "verdicts": [
            {"model": v.model, "version": v.version,
             "status": _name(listing_guard_pb2.VerdictStatus, v.status, "VERDICT_STATUS_"),
             "score": round(v.score, 6), "flagged": v.flagged, "review_threshold": round(v.review_threshold, 6),
             "block_threshold": round(v.threshold, 6), "label": v.label, "detail": v.detail,
             "latency_ms": round(v.latency_ms, 2), "cached": v.cached}
            for v in response.verdicts
        ],
        "suggestions": [{"category": s.category, "score": round(s.score, 6)} for s in response.suggestions],
        "versions": dict(response.versions),
        "policy_version": response.policy_version,
        "trace_id": response.trace_id,
    }  # fmt: skip
