"""The rollout policies in Consul KV: watched live by the gateway (each document validated, the last
valid one kept when a new one is refused), and read / written with check-and-set by operators."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter, Gauge

from meshserve.errors import FailedPrecondition
from meshserve.gateway.flow_config import ConfigDocWatch
from meshserve.gateway.rollout_policy import (
    ROLLOUT_PREFIX,
    ROLLOUT_SERVICES,
    RolloutPolicy,
    RolloutPolicyError,
    parse_rollout,
    rollout_key,
)
from meshserve.registry.client import RegistryClient
from meshserve.registry.config import RegistryConfig
from meshserve.registry.watch import KVSnapshot, WatchConfig

log = logging.getLogger(__name__)

ROLLOUT_VALID = Gauge("meshserve_gateway_rollout_policy_valid",
                      "1 while the service's rollout document is in force (or absent), 0 while refused", ["service"])
ROLLOUT_REJECTED = Counter("meshserve_gateway_rollout_policy_rejected_total",
                           "Rollout documents refused as invalid (each version counted once)", ["service"])
ROLLOUT_INDEX = Gauge("meshserve_gateway_rollout_policy_modify_index",
                      "KV ModifyIndex of the rollout policy in force (0: none)", ["service"])  # fmt: skip


@dataclass(frozen=True)
class RolloutState:
    """A service's policy in force (None: no policy, every passing version is eligible as before)
    and the last document refused since then."""

    policy: RolloutPolicy | None
    version: str  # "none" or the ModifyIndex of the document in force
    refused_version: str | None = None
    refused_reason: str | None = None

    def describe(self) -> dict[str, Any]:
        return {"version": self.version, "refused_version": self.refused_version,
                "refused_reason": self.refused_reason,
                "policy": self.policy.describe() if self.policy else None}  # fmt: skip


class RolloutPolicies:
    """Every service's rollout policy, kept current from `meshserve/rollout/`."""

    def __init__(self, registry: RegistryConfig, watch_config: WatchConfig | None = None):
        self._states = {service: RolloutState(None, "none") for service in ROLLOUT_SERVICES}
        self._watch = ConfigDocWatch(registry, ROLLOUT_PREFIX, watch_config, self._changed)
        for service in ROLLOUT_SERVICES:
            ROLLOUT_VALID.labels(service).set(1)
            ROLLOUT_INDEX.labels(service).set(0)

    async def start(self) -> None:
        await self._watch.start()

    async def stop(self) -> None:
        await self._watch.stop()

    def policy(self, service: str) -> RolloutPolicy | None:
        state = self._states.get(service)
        return state.policy if state else None

    def state(self, service: str) -> RolloutState:
        return self._states[service]

    def describe(self) -> dict[str, Any]:
        return {service: state.describe() for service, state in self._states.items()}

    def _changed(self, snapshot: KVSnapshot) -> None:
        if snapshot.stale:
            return  # the registry is away: keep what is in force
        docs: Mapping[str, tuple[str, int]] = snapshot.value  # type: ignore[assignment]
        for service in ROLLOUT_SERVICES:
            self._consider(service, docs.get(ROLLOUT_PREFIX + service))

    def _consider(self, service: str, doc: tuple[str, int] | None) -> None:
        state = self._states[service]
        if doc is None:
            if state.policy is not None:
                log.info("%s: rollout policy deleted; every passing version is eligible again", service)
            self._states[service] = RolloutState(None, "none")
            ROLLOUT_VALID.labels(service).set(1)
            ROLLOUT_INDEX.labels(service).set(0)
            return
        text, index = doc
        version = str(index)
        if version in (state.version, state.refused_version):
            return
        try:
            policy = parse_rollout(service, text, version)
        except RolloutPolicyError as exc:
            log.warning("%s: rollout policy version %s refused, keeping version %s: %s",
                        service, version, state.version, exc)  # fmt: skip
            ROLLOUT_REJECTED.labels(service).inc()
            ROLLOUT_VALID.labels(service).set(0)
            self._states[service] = RolloutState(state.policy, state.version, version, str(exc))
            return
        log.info("%s: rollout policy version %s in force: %s", service, version, policy.describe())
        ROLLOUT_VALID.labels(service).set(1)
        ROLLOUT_INDEX.labels(service).set(index)
        self._states[service] = RolloutState(policy, version)


# -- operators' side: read and write the documents ---------------------------------------------


@dataclass(frozen=True)
class StoredRollout:
    service: str
    text: str | None
    modify_index: int
    error: str | None

    @property
    def policy(self) -> RolloutPolicy | None:
        if self.text is None or self.error is not None:
            return None
        return parse_rollout(self.service, self.text, str(self.modify_index))

    def describe(self) -> dict[str, Any]:
        document: Any = None
        if self.text is not None:
            try:
                document = json.loads(self.text)
            except ValueError:
                document = self.text
        return {"service": self.service, "key": rollout_key(self.service), "modify_index": self.modify_index,
                "valid": self.error is None, "error": self.error, "document": document}  # fmt: skip


async def read_rollout(client: RegistryClient, service: str) -> StoredRollout:
    key = rollout_key(service)
    _, item = await client.call(f"kv get {key}", client.consul.kv.get(key))
    if item is None:
        return StoredRollout(service, None, 0, None)
    raw = item.get("Value") or b""
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)
    try:
        parse_rollout(service, text)
        error = None
    except RolloutPolicyError as exc:
        error = str(exc)
    return StoredRollout(service, text, int(item.get("ModifyIndex") or 0), error)


async def read_rollouts(client: RegistryClient) -> dict[str, StoredRollout]:
    return {service: await read_rollout(client, service) for service in ROLLOUT_SERVICES}


async def write_rollout(client: RegistryClient, policy: RolloutPolicy, cas: int | None = None) -> int:
    """Write `policy` only if the stored document is still version `cas` (None: the one read now)."""
    text = json.dumps(policy.to_document(), sort_keys=True)
    parse_rollout(policy.service, text)
    if cas is None:
        cas = (await read_rollout(client, policy.service)).modify_index
    key = rollout_key(policy.service)
    if not await client.call(f"kv put {key}", client.consul.kv.put(key, text, cas=cas)):
        raise FailedPrecondition(f"{key} changed since version {cas or 'none'}; read it again and retry")
    return (await read_rollout(client, policy.service)).modify_index
