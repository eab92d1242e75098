"""A steady, bounded search load against the gateway, recording every outcome (for resilience tests)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import grpc
import numpy as np

from meshserve.v1 import photo_search_pb2, photo_search_pb2_grpc


@dataclass
class Outcome:
    started: float  # monotonic
    seconds: float
    code: grpc.StatusCode
    details: str = ""
    coverage: tuple[int, int] = (0, 0)
    items: frozenset[str] = frozenset()
    shards: frozenset[str] = frozenset()


@dataclass
class SearchLoad:
    """Searches `photos` round-robin at `rate` per second from a thread until stopped (or `max_s`)."""

    target: str
    photos: list[bytes]
    rate: float = 10.0
    timeout_s: float = 5.0
    max_s: float = 180.0
    min_score: float = 0.01
    outcomes: list[Outcome] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> SearchLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.timeout_s + 5)

    def _run(self) -> None:
        with grpc.insecure_channel(self.target) as channel:
            stub = photo_search_pb2_grpc.PhotoSearchStub(channel)
            began = time.monotonic()
            n = 0
            while not self._stop.is_set() and time.monotonic() - began < self.max_s:
                request = photo_search_pb2.SearchRequest(image=self.photos[n % len(self.photos)], top_k=10,
                                                         min_detection_score=self.min_score, no_cache=True)
                started = time.monotonic()
                try:
                    reply = stub.Search(request, timeout=self.timeout_s)
                except grpc.RpcError as exc:
                    self.outcomes.append(Outcome(started, time.monotonic() - started, exc.code(), exc.details() or ""))
                else:
                    self.outcomes.append(Outcome(
                        started, time.monotonic() - started, grpc.StatusCode.OK,
                        coverage=(reply.coverage.shards_answered, reply.coverage.shards_expected),
                        items=frozenset(m.item_id for d in reply.detections for m in d.matches),
                        shards=frozenset(m.shard for d in reply.detections for m in d.matches),
                    ))  # fmt: skip
                n += 1
                self._stop.wait(max(0.0, began + n / self.rate - time.monotonic()))

    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.code != grpc.StatusCode.OK]

    def p99_ms(self, since: float = 0.0, until: float = float("inf")) -> float:
        window = [o.seconds for o in self.outcomes if since <= o.started < until]
        return float(np.percentile(window, 99) * 1000) if window else float("nan")
