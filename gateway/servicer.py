"""The gateway's gRPC face: SearchRequest ↔ SearchQuery/SearchResult and the caller's deadline.

Errors, spans and request metrics are the process's StatusInterceptor's job (gateway/server.py).
"""

from __future__ import annotations

import time

import grpc
from opentelemetry import trace

from meshserve.gateway.arms import SUBJECT, subject_from
from meshserve.gateway.photo_search import PhotoSearch, SearchQuery, SearchResult
from meshserve.v1 import photo_search_pb2, photo_search_pb2_grpc


class PhotoSearchServicer(photo_search_pb2_grpc.PhotoSearchServicer):
    def __init__(self, search: PhotoSearch, default_deadline_s: float = 10.0):
        self.search = search
        self.default_deadline_s = default_deadline_s

    async def Search(
        self, request: photo_search_pb2.SearchRequest, context: grpc.aio.ServicerContext
    ) -> photo_search_pb2.SearchResponse:
        remaining = context.time_remaining()
        # A caller without a deadline still gets one: no request may run unbounded.
        deadline = time.monotonic() + (self.default_deadline_s if remaining is None else remaining)
        SUBJECT.set(subject_from(context.invocation_metadata(), request.user_id))
        result = await self.search.search(to_query(request), deadline)
        trace.get_current_span().set_attribute("coverage", result.coverage)
        return to_response(result)


def to_query(request: photo_search_pb2.SearchRequest) -> SearchQuery:
    return SearchQuery(image=request.image, top_k=request.top_k, min_score=request.min_detection_score,
                       labels=tuple(request.labels), no_cache=request.no_cache,
                       user_id=request.user_id)  # fmt: skip


def to_response(result: SearchResult) -> photo_search_pb2.SearchResponse:
    response = photo_search_pb2.SearchResponse(trace_id=result.trace_id, cached=result.cached)
    for detection in result.detections:
        found = detection.found
        out = response.detections.add(label=found.label, score=found.score)
        out.box.x_min, out.box.y_min, out.box.x_max, out.box.y_max = found.box
        for match in detection.matches:
            out.matches.add(item_id=match.item_id, score=match.score, shard=match.shard,
                            attributes=match.attributes)  # fmt: skip
    response.coverage.shards_expected = result.shards_expected
    response.coverage.shards_answered = result.shards_answered
    response.coverage.missing_shards.extend(result.missing_shards)
    response.versions.update(result.versions)
    response.arms.update(result.arms)
    return response
