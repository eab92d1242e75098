"""Pieces for the rollout tests: a second version of a model (same weights, its card says another
version), writing rollout policies to KV, and calling the detector through the gateway's ListingGuard."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc

from meshserve.v1 import listing_guard_pb2, listing_guard_pb2_grpc
from tests.integration.guard_mesh import listing
from tests.integration.mesh_parts import MeshParts
from tests.support import DevAgent, wait_serving, wait_until


def version_copy(home: Path, kind: str, suffix: str, tmp: Path) -> tuple[Path, str]:
    """A copy of the newest `kind` artifact whose card says version <version>-<suffix>; (dir, version)."""
    from meshserve.inference.artifacts import latest

    source = latest(kind, home)
    assert source is not None
    target = tmp / f"{kind}-{suffix}"
    shutil.copytree(source, target)
    card = json.loads((target / "card.json").read_text())
    card["version"] = f"{card['version']}-{suffix}"
    (target / "card.json").write_text(json.dumps(card))
    return target, card["version"]


def card_version(home: Path, kind: str) -> str:
    from meshserve.inference.artifacts import latest

    source = latest(kind, home)
    assert source is not None
    return str(json.loads((source / "card.json").read_text())["version"])


def put_rollout(agent: DevAgent, service: str, doc: dict[str, Any] | str) -> int:
    client = agent.client()
    key = f"meshserve/rollout/{service}"
    assert client.kv.put(key, doc if isinstance(doc, str) else json.dumps(doc))
    _, item = client.kv.get(key)
    return int(item["ModifyIndex"])


def slow_detector_allowed(agent: DevAgent, timeout_ms: float = 5000) -> None:
    """The listing guard waits up to `timeout_ms` for the detector (its 250 ms default is tight on a
    loaded test machine, and these tests count answers, not speed)."""
    assert agent.client().kv.put("meshserve/config/listing-guard",
                                 json.dumps({"models": {"detector": {"timeout_ms": timeout_ms}}}))


def stable_and_candidate_detectors(parts: MeshParts, home: Path, tmp: Path, suffix: str, *candidate_flags: str,
                                   batch_flags: tuple[str, ...] = ("--max-batch-size", "1")) -> tuple[str, str]:
    """A detector of the home's version and one of a copy named `<version>-<suffix>` (started with
    `candidate_flags`), both serving; the listing guard's detector timeout relaxed. (stable, candidate)"""
    slow_detector_allowed(parts.agent)
    candidate_dir, candidate = version_copy(home, "detector", suffix, tmp)
    stable = card_version(home, "detector")
    for extra in ((), ("--model", str(candidate_dir), *candidate_flags)):
        server = parts.server("detector", *batch_flags, *extra)
        wait_serving(server.target, server.proc, timeout=120)
    return stable, candidate


def detector_check(target: str, photo: bytes, subject: str = "", listing_id: str = "",
                   timeout: float = 20.0) -> listing_guard_pb2.Verdict:  # fmt: skip
    """The detector's verdict for one listing with `photo`, asked through the gateway."""
    request = listing(photos=(photo,), models=("detector",))
    request.listing.listing_id = listing_id
    metadata = (("x-meshserve-subject", subject),) if subject else ()
    with grpc.insecure_channel(target) as channel:
        reply = listing_guard_pb2_grpc.ListingGuardStub(channel).Check(request, timeout=timeout, metadata=metadata)
    (verdict,) = reply.verdicts
    return verdict


class DetectorCaller:
    """Many detector checks over one channel, a few at a time."""

    def __init__(self, target: str, photo: bytes, parallel: int = 4):
        self.channel = grpc.insecure_channel(target)
        self.stub = listing_guard_pb2_grpc.ListingGuardStub(self.channel)
        self.photo = photo
        self.pool = ThreadPoolExecutor(parallel)

    def one(self, subject: str = "") -> listing_guard_pb2.Verdict:
        request = listing(photos=(self.photo,), models=("detector",))
        metadata = (("x-meshserve-subject", subject),) if subject else ()
        reply = self.stub.Check(request, timeout=20, metadata=metadata)
        (verdict,) = reply.verdicts
        return verdict

    def many(self, n: int) -> list[listing_guard_pb2.Verdict]:
        return list(self.pool.map(lambda _: self.one(), range(n)))

    def close(self) -> None:
        self.pool.shutdown()
        self.channel.close()


def wait_policy_in_force(caller: DetectorCaller, versions: set[str], timeout: float = 20.0) -> None:
    """Until the gateway answers only from `versions` (a policy just written has been applied)."""
    wait_until(lambda: {v.version for v in caller.many(8)} <= versions, timeout=timeout,
               what=f"answers only from versions {sorted(versions)}")  # fmt: skip


class Load:
    """Detector checks in a background thread until stopped: every verdict (or failure) recorded."""

    def __init__(self, target: str, photo: bytes):
        import threading

        self.caller = DetectorCaller(target, photo, parallel=1)
        self.verdicts: list[tuple[float, str, str, int]] = []  # (monotonic, version, arm, status)
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.caller.close()

    def _run(self) -> None:
        import time

        while not self._stop.is_set():
            try:
                v = self.caller.one()
            except grpc.RpcError as exc:
                self.failures.append(f"{exc.code().name}: {exc.details()}")
                continue
            self.verdicts.append((time.monotonic(), v.version, v.arm, v.status))


class SearchLoad:
    """Photo searches in a background thread until stopped: each answer's versions, arms, shards and
    whether the photo's item was in the top 10."""

    def __init__(self, target: str, photos: list[Any]):
        import threading

        from meshserve.v1 import photo_search_pb2_grpc

        self.channel = grpc.insecure_channel(target)
        self.stub = photo_search_pb2_grpc.PhotoSearchStub(self.channel)
        self.photos = photos
        self.answers: list[dict[str, Any]] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> SearchLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        self.channel.close()

    def _run(self) -> None:
        from meshserve.v1 import photo_search_pb2

        n = 0
        while not self._stop.is_set():
            photo = self.photos[n % len(self.photos)]
            n += 1
            request = photo_search_pb2.SearchRequest(image=photo.jpeg, min_detection_score=0.01, no_cache=True)
            try:
                reply = self.stub.Search(request, timeout=30)
            except grpc.RpcError as exc:
                self.failures.append(f"{exc.code().name}: {exc.details()}")
                continue
            found = {int(m.item_id) for d in reply.detections for m in d.matches[:10]}
            self.answers.append({
                "versions": dict(reply.versions), "arms": dict(reply.arms),
                "shards": {m.shard for d in reply.detections for m in d.matches},
                "hit": bool(found & set(photo.item_ids)),
                "coverage": (reply.coverage.shards_answered, reply.coverage.shards_expected),
            })  # fmt: skip
