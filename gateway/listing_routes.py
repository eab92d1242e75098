"""The listing models' routes: per model name (registry meta `model`) and version, the passing
replicas of the violation classifiers and the shipping estimator, kept live from the registry (last
known good while it is away, and an all-critical answer right after an outage held: outage_hold.py)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from meshserve.gateway.admission import Admission
from meshserve.gateway.balancer import ChannelFactory, ReplicaSet, insecure_channel
from meshserve.gateway.discovery import Registered, RegisteredWatch
from meshserve.gateway.flow_policy import SHIPPING
from meshserve.gateway.outage_hold import OutageHold
from meshserve.gateway.policy import CallPolicy
from meshserve.gateway.routes import _version_key
from meshserve.registry.config import SERVICE_NAMES, RegistryConfig
from meshserve.registry.watch import ServiceSnapshot, WatchConfig

# Services the guard routes to here (the detector comes from the gateway's RouteTable).
LISTING_SERVICES = ("classifier", "shipping")


@dataclass(frozen=True)
class ModelRoute:
    model: str
    version: str
    replicas: ReplicaSet


class ListingRoutes:
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
        self.admission = admission
        self._watch_config = watch_config
        self._watches: list[RegisteredWatch] = []
        # model name → version → passing replicas
        self._sets: dict[str, dict[str, ReplicaSet]] = defaultdict(dict)
        self._outage = OutageHold()

    async def start(self) -> None:
        for service in LISTING_SERVICES:
            def on_change(snap: ServiceSnapshot, service: str = service) -> None:
                self._apply(service, snap.value, snap.stale)  # type: ignore[arg-type]

            watch = RegisteredWatch(self.registry, SERVICE_NAMES[service], self._watch_config, on_change)
            self._watches.append(watch)
            await watch.start()

    async def close(self) -> None:
        for watch in self._watches:
            await watch.stop()
        for by_version in self._sets.values():
            for replicas in by_version.values():
                await replicas.close()

    def _apply(self, service: str, registered: tuple[Registered, ...], stale: bool = False) -> None:
        if stale:  # the registry is away: keep routing on what we had
            self._outage.went_away(service)
            return
        if self.admission is not None:
            registered = self.admission.admit(service, registered, lambda: self._apply_latest(service))
        self._outage.answered(service)
        if self._outage.holds(service, registered, self._has_passing(service), lambda: self._apply_latest(service)):
            return
        wanted: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
        for r in registered:
            if r.passing:
                meta = r.instance.meta
                # The shipping estimator answers to one name in the policy, whatever its card says.
                model = SHIPPING if service == "shipping" else meta.get("model", "")
                wanted[model][meta.get("version", "")].append(r.instance)
        models = {m for m, s in self._sets.items() if s and self._service_of(m) == service} | set(wanted)
        for model in models:
            sets = self._sets[model]
            for version in set(sets) | set(wanted.get(model, {})):
                if version not in sets:
                    sets[version] = ReplicaSet(f"{model}@{version}", self.policies[service], self._factory)
                sets[version].update(wanted.get(model, {}).get(version, []))

    def _apply_latest(self, service: str) -> None:
        for watch in self._watches:
            if watch.service == SERVICE_NAMES[service] and not watch.snapshot.stale:
                self._apply(service, watch.snapshot.value)  # type: ignore[arg-type]

    def _has_passing(self, service: str) -> bool:
        return any(len(replicas) for model, by_version in self._sets.items() if self._service_of(model) == service
                   for replicas in by_version.values())  # fmt: skip

    @staticmethod
    def _service_of(model: str) -> str:
        return "shipping" if model == SHIPPING else "classifier"

    def route(self, model: str) -> ModelRoute | None:
        """The newest version of `model` with passing replicas (a new version takes over as soon
        as it passes; the old one serves until then)."""
        versions = [v for v, s in self._sets.get(model, {}).items() if len(s)]
        if not versions:
            return None
        version = max(versions, key=_version_key)
        return ModelRoute(model, version, self._sets[model][version])

    def passing_versions(self, model: str) -> dict[str, ReplicaSet]:
        return {v: s for v, s in self._sets.get(model, {}).items() if len(s)}

    def describe(self) -> dict[str, dict[str, list[str]]]:
        return {model: {v: [r.id for r in s.replicas] for v, s in sets.items()}
                for model, sets in self._sets.items()}  # fmt: skip
