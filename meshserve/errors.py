"""The one error tree of meshserve and its single mapping to gRPC statuses.

    MeshError
     ├── InvalidInput         → INVALID_ARGUMENT   (the caller sent something wrong)
     ├── NotFound             → NOT_FOUND          (unknown model, job, shard …)
     ├── FailedPrecondition   → FAILED_PRECONDITION (valid, but not for this server: dim/version mismatch)
     ├── Overloaded           → RESOURCE_EXHAUSTED (bounded queue full; retry elsewhere)
     ├── NotReady             → UNAVAILABLE        (loading, draining, no replica)
     └── DeadlineExpired      → DEADLINE_EXCEEDED  (the caller's deadline ran out)

Anything else is a bug: INTERNAL, logged with the trace id.
"""

from __future__ import annotations

import grpc


class MeshError(Exception):
    """Base of every error meshserve raises on purpose."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidInput(MeshError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(MeshError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(MeshError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Overloaded(MeshError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class NotReady(MeshError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExpired(MeshError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The wire status for an exception: the tree above, INTERNAL for the rest."""
    if isinstance(exc, MeshError):
        return exc.code
    return grpc.StatusCode.INTERNAL
