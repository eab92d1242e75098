"""The client of PhotoSearch: a thin wrapper over the generated stub (the example services copy)."""

from __future__ import annotations

from typing import Any

import grpc

from meshserve.registry.config import SERVICE_NAMES
from meshserve.rpc import tls
from meshserve.rpc.channel_options import client_options
from meshserve.rpc.tls_files import client_files
from meshserve.v1 import photo_search_pb2, photo_search_pb2_grpc

GATEWAY = SERVICE_NAMES["gateway"]  # the name the gateway's certificate must carry


class SearchFailed(Exception):
    """The gateway refused or failed the search; the message names the status and why."""


def search_photo(target: str, image: bytes, top_k: int = 10, timeout: float = 10.0,
                 min_score: float = 0.0) -> photo_search_pb2.SearchResponse:
    """One Search call with a deadline; raises SearchFailed with the gateway's status and message.
    `min_score` 0 means the gateway's default detection threshold. mTLS with the caller's credentials
    (MESHSERVE_TLS_*, else the local mesh's under $MESHSERVE_HOME/pki), plaintext when there are none."""
    with tls.channel(target, GATEWAY, client_options(16 * 1024 * 1024), client_files()) as channel:
        stub = photo_search_pb2_grpc.PhotoSearchStub(channel)
        try:
            request = photo_search_pb2.SearchRequest(image=image, top_k=top_k, min_detection_score=min_score)
            return stub.Search(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise SearchFailed(f"{exc.code().name}: {exc.details()}") from None


def result_json(response: photo_search_pb2.SearchResponse) -> dict[str, Any]:
    """The (contract) JSON shape of `meshserve search --json`."""
    expected = response.coverage.shards_expected
    return {
        "detections": [
            {
                "box": [d.box.x_min, d.box.y_min, d.box.x_max, d.box.y_max],
                "label": d.label,
                "score": d.score,
                "matches": [{"item_id": m.item_id, "score": m.score, "shard": m.shard} for m in d.matches],
            }
            for d in response.detections
        ],
        "coverage": response.coverage.shards_answered / expected if expected else 0.0,
        "versions": dict(response.versions),
        "trace_id": response.trace_id,
    }
