"""The flows' live policies: one blocking-query watch of `meshserve/config/`, each document validated
before use, the last valid one kept when a new one is refused."""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from prometheus_client import Counter, Gauge

from meshserve.gateway.flow_policy import CONFIG_PREFIX, FLOWS, PolicyError
from meshserve.registry.config import RegistryConfig
from meshserve.registry.watch import KVSnapshot, KVWatch, WatchConfig

log = logging.getLogger(__name__)

POLICY_VALID = Gauge("meshserve_gateway_policy_valid",
                     "1 while the flow's KV document is in force (or absent), 0 while it is refused", ["flow"])
POLICY_REJECTED = Counter("meshserve_gateway_policy_rejected_total",
                          "Policy documents refused as invalid (each version counted once)", ["flow"])
POLICY_INDEX = Gauge("meshserve_gateway_policy_modify_index",
                     "KV ModifyIndex of the policy in force (0: built-in defaults)", ["flow"])  # fmt: skip


class ConfigDocWatch(KVWatch):
    """Every key under a prefix → (text, ModifyIndex): the index is the document's version."""

    kind = "kv-doc"  # its own parse-cache entries and metrics label

    def _parse(self, data: Any) -> Mapping[str, tuple[str, int]]:  # type: ignore[override]
        out = {}
        for item in data or ():
            raw = base64.b64decode(item["Value"]) if item.get("Value") else b""
            out[str(item["Key"])] = (raw.decode("utf-8", errors="replace"), int(item.get("ModifyIndex") or 0))
        return MappingProxyType(out)


@dataclass(frozen=True)
class FlowState:
    """What a flow runs on, and the last document refused since then (for status and logs)."""

    policy: Any
    version: str  # "default" or the ModifyIndex of the document in force
    refused_version: str | None = None
    refused_reason: str | None = None

    def describe(self) -> dict[str, Any]:
        return {"version": self.version, "refused_version": self.refused_version,
                "refused_reason": self.refused_reason, "policy": self.policy.describe()}  # fmt: skip


class FlowConfigs:
    """The policy of every flow in FLOWS, kept current from Consul KV.

    `on_apply[flow](policy)` runs whenever a flow's policy in force changes.
    """

    def __init__(
        self,
        registry: RegistryConfig,
        watch_config: WatchConfig | None = None,
        on_apply: Mapping[str, Callable[[Any], None]] | None = None,
    ):
        self._states = {flow: FlowState(default, "default") for flow, (_, default) in FLOWS.items()}
        self._on_apply = dict(on_apply or {})
        self._watch = ConfigDocWatch(registry, CONFIG_PREFIX, watch_config, self._changed)
        for flow in FLOWS:
            POLICY_VALID.labels(flow).set(1)
            POLICY_INDEX.labels(flow).set(0)

    async def start(self) -> None:
        await self._watch.start()

    async def stop(self) -> None:
        await self._watch.stop()

    @property
    def ready(self) -> bool:
        """The registry has answered at least once (until then the built-in defaults apply)."""
        return self._watch.snapshot.ready

    def state(self, flow: str) -> FlowState:
        return self._states[flow]

    def policy(self, flow: str) -> Any:
        return self._states[flow].policy

    def describe(self) -> dict[str, Any]:
        return {flow: state.describe() for flow, state in self._states.items()}

    def _changed(self, snapshot: KVSnapshot) -> None:
        if snapshot.stale:
            return  # the registry is away: keep what is in force
        docs: Mapping[str, tuple[str, int]] = snapshot.value  # type: ignore[assignment]
        for flow in FLOWS:
            self._consider(flow, docs.get(CONFIG_PREFIX + flow))

    def _consider(self, flow: str, doc: tuple[str, int] | None) -> None:
        state = self._states[flow]
        parse, default = FLOWS[flow]
        if doc is None:
            if state.version != "default":
                log.info("%s: policy document deleted; built-in defaults in force", flow)
                self._apply(flow, FlowState(default, "default"))
            return
        text, index = doc
        version = str(index)
        if version in (state.version, state.refused_version):
            return  # already in force, or already refused (and logged) once
        try:
            policy = parse(text, version)
        except PolicyError as exc:
            log.warning("%s: policy document version %s refused, keeping version %s: %s",
                        flow, version, state.version, exc)  # fmt: skip
            POLICY_REJECTED.labels(flow).inc()
            POLICY_VALID.labels(flow).set(0)
            self._states[flow] = FlowState(state.policy, state.version, version, str(exc))
            return
        log.info("%s: policy version %s in force", flow, version)
        self._apply(flow, FlowState(policy, version))

    def _apply(self, flow: str, state: FlowState) -> None:
        self._states[flow] = state
        POLICY_VALID.labels(flow).set(1)
        POLICY_INDEX.labels(flow).set(int(state.version) if state.version.isdigit() else 0)
        callback = self._on_apply.get(flow)
        if callback is not None:
            callback(state.policy)
