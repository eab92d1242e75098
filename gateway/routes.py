"""The gateway's route table: replica sets per stage, shard sets per embedder version, kept live
from the registry. Last known good while the registry is away; never emptied by a blink."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import Gauge

from meshserve.gateway.admission import Admission
from meshserve.gateway.balancer import ChannelFactory, ReplicaSet, insecure_channel
from meshserve.gateway.discovery import Registered, RegisteredWatch
from meshserve.gateway.outage_hold import OutageHold
from meshserve.gateway.policy import CallPolicy
from meshserve.registry.config import SERVICE_NAMES, RegistryConfig
from meshserve.registry.watch import ServiceSnapshot, WatchConfig

log = logging.getLogger(__name__)

ROUTES_STALE = Gauge("meshserve_gateway_registry_stale",
                     "1 while routes come from the last known registry state")
STALENESS = Gauge("meshserve_gateway_registry_staleness_seconds", "Seconds since the registry last answered")
SHARDS = Gauge("meshserve_gateway_shards", "Shards of the live embedder version", ["state"])
REPLICAS = Gauge("meshserve_gateway_replicas", "Passing replicas in the route table", ["stage"])


@dataclass(frozen=True)
class ShardRoute:
    shard: str
    replicas: ReplicaSet  # passing replicas only; empty = expected but missing


@dataclass(frozen=True)
class SearchRoute:
    """Everything one search needs, fixed at its start so a concurrent change cannot mix sets."""

    detector: ReplicaSet
    detector_version: str
    embedder: ReplicaSet
    embedder_version: str
    index: str
    shards: tuple[ShardRoute, ...]
    stale: bool
    detector_arm: str = "stable"
    embedder_arm: str = "stable"


def _version_key(version: str) -> tuple[int, tuple[int, ...] | str]:
    """Order of versions: all-numeric ones (timestamps, 1.2.3) by number, others by text after them."""
    parts = version.replace("-", ".").split(".")
    if all(p.isdigit() for p in parts):
        return (0, tuple(int(p) for p in parts))
    return (1, version)


class RouteTable:
    def __init__(
        self,
        registry: RegistryConfig,
        policies: dict[str, CallPolicy],
        channel_factory: ChannelFactory = insecure_channel,
        watch_config: WatchConfig | None = None,
        admission: Admission | None = None,
    ):
        self.registry = registry
        self.policies = policies
        self._factory = channel_factory
        self.admission = admission  # None: route to every passing registration as it is
        self._watch_config = watch_config
        self._watches: dict[str, RegisteredWatch] = {}
        # stage → version → replica set; indexers: embedder version → shard → replica set
        self._sets: dict[str, dict[str, ReplicaSet]] = defaultdict(dict)
        self._shards: dict[str, dict[str, ReplicaSet]] = defaultdict(dict)
        self._shard_index: dict[str, str] = {}
        self.live_embedder_version: str | None = None
        self._readiness_listeners: list[Callable[[bool], None]] = []
        self._ready = False
        self._outage = OutageHold()

    async def start(self, stages: tuple[str, ...] = ("detector", "embedder", "indexer")) -> None:
        for stage in stages:
            def on_change(snap: ServiceSnapshot, stage: str = stage) -> None:
                self._apply(stage, snap.value, snap.stale)  # type: ignore[arg-type]

            watch = RegisteredWatch(self.registry, SERVICE_NAMES[stage], self._watch_config, on_change)
            self._watches[stage] = watch
            await watch.start()

    async def close(self) -> None:
        for watch in self._watches.values():
            await watch.stop()
        for by_version in (*self._sets.values(), *self._shards.values()):
            for replicas in by_version.values():
                await replicas.close()

    # -- keeping up with the registry ---------------------------------------------------

    def _apply(self, stage: str, registered: tuple[Registered, ...], stale: bool = False) -> None:
        if stale:
            # The registry is away: keep routing on what we had (the watch keeps its value too).
            self._outage.went_away(stage)
            self._report_staleness()
            return
        self._report_staleness()
        if self.admission is not None:
            registered = self.admission.admit(stage, registered, lambda: self._apply_latest(stage))
        self._outage.answered(stage)
        if self._outage.holds(stage, registered, self._has_passing(stage), lambda: self._apply_latest(stage)):
            return
        if stage == "indexer":
            self._apply_shards(registered)
        else:
            self._apply_versions(stage, registered)
        self._choose_embedder_version()
        REPLICAS.labels(stage).set(sum(1 for r in registered if r.passing))
        self._tell_readiness()

    def _has_passing(self, stage: str) -> bool:
        sets = self._shards.values() if stage == "indexer" else (self._sets[stage],)
        return any(len(replicas) for by_key in sets for replicas in by_key.values())

    def _apply_latest(self, stage: str) -> None:
        watch = self._watches.get(stage)
        if watch is not None:
            snap = watch.snapshot
            self._apply(stage, snap.value, snap.stale)  # type: ignore[arg-type]

    def _tell_readiness(self) -> None:
        ready = self.can_search()
        if ready != self._ready:
            self._ready = ready
            log.info("photo search %s", "can be served" if ready else "cannot be served: no complete route")
            for listener in self._readiness_listeners:
                listener(ready)

    def _apply_versions(self, stage: str, registered: tuple[Registered, ...]) -> None:
        by_version: dict[str, list] = defaultdict(list)
        for r in registered:
            if r.passing:
                by_version[r.instance.meta.get("version", "")].append(r.instance)
        sets = self._sets[stage]
        for version in set(sets) | set(by_version):
            if version not in sets:
                sets[version] = ReplicaSet(f"{stage}@{version}", self.policies[stage], self._factory)
            sets[version].update(by_version.get(version, []))

    def _apply_shards(self, registered: tuple[Registered, ...]) -> None:
        groups: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
        for r in registered:
            meta = r.instance.meta
            version, shard = meta.get("embedder_version", ""), meta.get("shard", "")
            self._shard_index[f"{version}/{shard}"] = meta.get("index", "")
            replicas = groups[version][shard]
            if r.passing:
                replicas.append(r.instance)
        policy = self.policies["indexer"]
        for version in set(self._shards) | set(groups):
            shards = self._shards[version]
            wanted = groups.get(version, {})
            for shard in list(shards):
                if shard not in wanted:  # deregistered: gone on purpose
                    shards.pop(shard).update([])
            for shard, instances in wanted.items():
                if shard not in shards:
                    shards[shard] = ReplicaSet(f"shard {shard}@{version}", policy, self._factory)
                shards[shard].update(instances)
            if not shards:
                del self._shards[version]

    def _choose_embedder_version(self) -> None:
        """Newest version with passing embedders and a complete shard set; the live one stays
        live while it still has embedders (a killed shard lowers coverage, it does not flip)."""
        serving = [v for v, s in self._sets["embedder"].items() if len(s) and self._shards.get(v)]
        complete = [v for v in serving if all(len(s) for s in self._shards[v].values())]
        live = self.live_embedder_version
        newer = [v for v in complete if live is None or _version_key(v) > _version_key(live)]
        if newer:
            chosen: str | None = max(newer, key=_version_key)
        elif live in serving:
            chosen = live
        elif serving:
            chosen = max(serving, key=lambda v: (v in complete, _version_key(v)))
        else:
            chosen = None
        if chosen != live:
            log.info("live embedder version: %s → %s", live, chosen)
            self.live_embedder_version = chosen
        if chosen is not None:
            shards = self._shards[chosen].values()
            SHARDS.labels("passing").set(sum(1 for s in shards if len(s)))
            SHARDS.labels("missing").set(sum(1 for s in shards if not len(s)))

    def _report_staleness(self) -> None:
        ROUTES_STALE.set(1 if self.stale else 0)
        STALENESS.set(max((w.staleness_s for w in self._watches.values()), default=0.0))

    # -- what a request sees --------------------------------------------------------------

    def can_search(self) -> bool:
        """A detector, embedders of the live version and a passing replica for each of its shards.
        (A search still runs with a shard missing, at lower coverage; readiness asks for all, so a
        load balancer prefers a gateway that answers in full.)"""
        route = self.search_route()
        return route is not None and bool(route.shards) and all(len(s.replicas) for s in route.shards)

    def watch_readiness(self, listener: Callable[[bool], None]) -> None:
        """`listener(can_search())` now and on every change after."""
        self._readiness_listeners.append(listener)
        listener(self._ready)

    @property
    def stale(self) -> bool:
        return any(w.snapshot.stale and w.snapshot.ready for w in self._watches.values())

    def staleness_s(self) -> float:
        return max((w.staleness_s for w in self._watches.values()), default=0.0)

    def newest(self, stage: str) -> tuple[str, ReplicaSet] | None:
        """The newest version of a stage that has passing replicas."""
        versions = [v for v, s in self._sets[stage].items() if len(s)]
        if not versions:
            return None
        version = max(versions, key=_version_key)
        return version, self._sets[stage][version]

    def search_route(self) -> SearchRoute | None:
        detector = self.newest("detector")
        version = self.live_embedder_version
        if detector is None or version is None:
            return None
        return self.search_route_with(detector[0], detector[1], version)

    def passing_versions(self, stage: str) -> dict[str, ReplicaSet]:
        return {v: s for v, s in self._sets[stage].items() if len(s)}

    def embedder_unready(self, version: str, complete: bool) -> str | None:
        """Why `version` cannot take searches (None: it can): it needs passing embedders and shards,
        and with `complete` a passing replica for every one of its shards."""
        embedders = self._sets["embedder"].get(version)
        if embedders is None or not len(embedders):
            return f"no passing embedder of version {version}"
        shards = self._shards.get(version)
        if not shards:
            return f"no shards built for embedder version {version}"
        missing = sorted(s for s, replicas in shards.items() if not len(replicas))
        if complete and missing:
            return f"shard set of embedder version {version} incomplete: {', '.join(missing)} not passing"
        return None

    def search_route_with(self, detector_version: str, detector: ReplicaSet, version: str) -> SearchRoute | None:
        if version not in self._sets["embedder"]:
            return None
        shards = self._shards.get(version, {})
        index = next((self._shard_index.get(f"{version}/{s}", "") for s in shards), "")
        return SearchRoute(
            detector=detector, detector_version=detector_version,
            embedder=self._sets["embedder"][version], embedder_version=version, index=index,
            shards=tuple(ShardRoute(shard, replicas) for shard, replicas in sorted(shards.items())),
            stale=self.stale,
        )  # fmt: skip

    def describe(self) -> dict[str, object]:
        """The table as plain data, for `meshserve status` and logs."""
        now = time.monotonic()
        return {
            "stale": self.stale,
            "staleness_s": round(self.staleness_s(), 3),
            "live_embedder_version": self.live_embedder_version,
            "stages": {stage: {v: [r.id + (" (ejected)" if r.ejected(now) else "") for r in s.replicas]
                               for v, s in sets.items()} for stage, sets in self._sets.items()},
            "shards": {v: {shard: [r.id for r in s.replicas] for shard, s in shards.items()}
                       for v, shards in self._shards.items()},
        }  # fmt: skip
