"""Which registrations the gateway routes to: an indexer's meta must be complete and consistent, and under mTLS a
replica must prove, in a TLS handshake, that its certificate names the service it registered as."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import Gauge

from meshserve.gateway.discovery import Registered
from meshserve.gateway.mesh_channels import MeshChannels
from meshserve.registry.config import SERVICE_NAMES
from meshserve.registry.instances import Instance

log = logging.getLogger(__name__)

REJECTED = Gauge("meshserve_gateway_rejected_registrations",
                 "Registered replicas the gateway does not route to, by service and reason kind", ["service", "kind"])
METRICS = ("ip", "l2", "cosine")  # hnswlib's spaces
PROBE_TIMEOUT_S = 3.0
RETRY_REJECTED_S = 5.0  # a refused replica is asked again this often (it may have been given the right certificate)
PENDING = "pending"  # status of a passing replica whose identity is being checked: no traffic yet


def meta_problem(instance: Instance) -> str | None:
    """What is wrong with an indexer's meta (missing, not a number, count < 1, unknown metric); None if fine."""
    if instance.name != SERVICE_NAMES["indexer"]:
        return None
    meta = instance.meta
    required = ("index", "shard", "embedder_version", "version", "dim", "count", "metric")
    missing = [k for k in required if not meta.get(k)]
    if missing:
        return f"indexer meta lacks {', '.join(missing)}"
    for key in ("dim", "count"):
        if not meta[key].isdigit():
            return f"indexer meta {key}={meta[key]!r} is not a whole number"
    if int(meta["dim"]) < 1:
        return "indexer meta dim must be ≥ 1"
    if int(meta["count"]) < 1:
        return f"indexer meta count={meta['count']} (an empty shard answers nothing)"
    if meta["metric"] not in METRICS:
        return f"indexer meta metric={meta['metric']!r} is none of {', '.join(METRICS)}"
    return None


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str = ""
    at: float = 0.0  # monotonic time of the probe


@dataclass(frozen=True)
class Rejection:
    id: str
    service: str
    target: str
    kind: str  # meta | identity
    reason: str


async def probe_identity(channels: MeshChannels, instance: Instance, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """One health call over the replica's identity-checked channel: None when the TLS handshake succeeded (any
    answer proves it), else what refused it."""
    channel = channels.for_instance(instance)
    try:
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        return None
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.UNAVAILABLE and exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            return None  # the server answered: the handshake passed
        details = exc.details() or ""
        if "Hostname Verification" in details or "No match found for server name" in details:
            return (f"certificate does not name {instance.name} (TLS server name check failed): "
                    f"registered as {instance.name} with another service's certificate")  # fmt: skip
        return f"TLS handshake or connection failed: {details[-200:]}"
    finally:
        await channel.close()


class Admission:
    """Filters the registry's answer before routes are built from it. Indexers with bad meta are dropped; under mTLS
    a passing replica is routed only after its identity probe succeeded (until then it counts as not passing)."""

    def __init__(self, channels: MeshChannels | None):
        self.channels = channels if channels is not None and channels.secure else None
        self._verdicts: dict[str, dict[tuple[str, str], Verdict]] = {}  # service → (id, target) → verdict
        self._probing: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._rejected: dict[str, dict[str, Rejection]] = {}  # service → instance id → why

    def admit(self, service: str, registered: tuple[Registered, ...],
              changed: Callable[[], None]) -> tuple[Registered, ...]:  # fmt: skip
        """The registrations to route by; `changed()` is called when a probe's verdict would change the answer."""
        out: list[Registered] = []
        rejected: dict[str, Rejection] = {}
        verdicts = self._verdicts.setdefault(service, {})
        present = {(r.instance.id, r.instance.target) for r in registered}
        for key in set(verdicts) - present:  # gone, or back at another address: asked again then
            del verdicts[key]
        for r in registered:
            instance = r.instance
            problem = meta_problem(instance)
            if problem is not None:
                rejected[instance.id] = Rejection(instance.id, service, instance.target, "meta", problem)
                continue
            if self.channels is None or not r.passing:
                out.append(r)
                continue
            key = (instance.id, instance.target)
            verdict = verdicts.get(key)
            if verdict is None or (not verdict.ok and time.monotonic() - verdict.at >= RETRY_REJECTED_S):
                self._start_probe(verdicts, key, instance, changed)
            if verdict is not None and verdict.ok:
                out.append(r)
                continue
            if verdict is not None:
                rejected[instance.id] = Rejection(instance.id, service, instance.target, "identity", verdict.reason)
            out.append(replace(r, passing=False, status=PENDING if verdict is None else "rejected"))
        self._record(service, rejected)
        return tuple(out)

    def _start_probe(self, verdicts: dict[tuple[str, str], Verdict], key: tuple[str, str], instance: Instance,
                     changed: Callable[[], None]) -> None:  # fmt: skip
        if key in self._probing or self.channels is None:
            return
        channels = self.channels

        async def probe() -> None:
            reason = await probe_identity(channels, instance)
            before = verdicts.get(key)
            verdicts[key] = Verdict(reason is None, reason or "", time.monotonic())
            if reason is not None and (before is None or before.reason != reason):
                log.warning("not routing to %s at %s: %s", instance.id, instance.target, reason)
            if before is None or before.ok != (reason is None):
                changed()
            elif reason is not None:  # still refused: ask again later
                asyncio.get_running_loop().call_later(RETRY_REJECTED_S, changed)

        task = asyncio.get_running_loop().create_task(probe())
        self._probing[key] = task
        task.add_done_callback(lambda _t: self._probing.pop(key, None))

    def _record(self, service: str, rejected: dict[str, Rejection]) -> None:
        before = self._rejected.get(service, {})
        for r in rejected.values():
            if r.id not in before or before[r.id].reason != r.reason:
                log.warning("%s: ignoring registration %s at %s: %s", service, r.id, r.target, r.reason)
        self._rejected[service] = rejected
        for kind in ("meta", "identity"):
            REJECTED.labels(service, kind).set(sum(1 for r in rejected.values() if r.kind == kind))

    def rejections(self) -> list[Rejection]:
        return [r for by_id in self._rejected.values() for r in by_id.values()]

    async def close(self) -> None:
        for task in list(self._probing.values()):
            task.cancel()
        await asyncio.gather(*self._probing.values(), return_exceptions=True)
