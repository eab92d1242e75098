"""Validated documents under one Consul KV prefix, watched live: every new version is parsed before it is
used, and a refused one leaves the last valid document in force (logged and counted once, shown in status)."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Generic, TypeVar

from prometheus_client import Counter, Gauge

from meshserve.registry.client import RegistryClient
from meshserve.registry.config import RegistryConfig
from meshserve.registry.watch import KVSnapshot, KVWatch, WatchConfig

log = logging.getLogger(__name__)

P = TypeVar("P")


class DocumentWatch(KVWatch):
    """Every key under a prefix → (text, ModifyIndex): the index is the document's version."""

    kind = "kv-doc"  # its own parse-cache entries and metrics label

    def _parse(self, data: Any) -> Mapping[str, tuple[str, int]]:  # type: ignore[override]
        out = {}
        for item in data or ():
            raw = base64.b64decode(item["Value"]) if item.get("Value") else b""
            out[str(item["Key"])] = (raw.decode("utf-8", errors="replace"), int(item.get("ModifyIndex") or 0))
        return MappingProxyType(out)


@dataclass(frozen=True)
class DocumentState(Generic[P]):
    """The policy a name runs on, and the last document refused since then (for status and logs)."""

    policy: P
    version: str  # the kind's default_version, or the ModifyIndex of the document in force
    refused_version: str | None = None
    refused_reason: str | None = None

    def describe(self) -> dict[str, Any]:
        policy = self.policy.describe() if self.policy is not None else None  # type: ignore[attr-defined]
        return {"version": self.version, "refused_version": self.refused_version,
                "refused_reason": self.refused_reason, "policy": policy}  # fmt: skip


@dataclass(frozen=True)
class DocumentMetrics:
    """Gauges and a counter labelled by the document's name."""

    valid: Gauge  # 1 while the document is in force (or absent), 0 while a newer one is refused
    rejected: Counter  # documents refused, each version once
    index: Gauge  # ModifyIndex in force, 0 for the default


@dataclass(frozen=True)
class DocumentKind(Generic[P]):
    """What the documents under one prefix are: which names are read and how each is parsed."""

    prefix: str
    names: tuple[str, ...]  # the keys read are prefix + name
    parse: Callable[[str, str, str], P]  # (name, text, version) → policy, or raises `refused`
    refused: type[Exception]
    default: Callable[[str], P]  # the policy in force while a name has no document
    default_version: str
    what: str  # for log lines: "policy", "rollout policy"
    metrics: DocumentMetrics


class LiveDocuments(Generic[P]):
    """The policy of every name of a DocumentKind, kept current from Consul KV.

    `on_apply[name](policy)` runs whenever a name's policy in force changes.
    """

    def __init__(self, registry: RegistryConfig, kind: DocumentKind[P], watch_config: WatchConfig | None = None,
                 on_apply: Mapping[str, Callable[[P], None]] | None = None):  # fmt: skip
        self.kind = kind
        self._states = {name: DocumentState(kind.default(name), kind.default_version) for name in kind.names}
        self._on_apply = dict(on_apply or {})
        self._watch = DocumentWatch(registry, kind.prefix, watch_config, self._changed)
        for name in kind.names:
            kind.metrics.valid.labels(name).set(1)
            kind.metrics.index.labels(name).set(0)

    async def start(self) -> None:
        await self._watch.start()

    async def stop(self) -> None:
        await self._watch.stop()

    @property
    def ready(self) -> bool:
        """The registry has answered at least once (until then the defaults apply)."""
        return self._watch.snapshot.ready

    def state(self, name: str) -> DocumentState[P]:
        return self._states[name]

    def policy(self, name: str) -> P:
        return self._states[name].policy

    def describe(self) -> dict[str, Any]:
        return {name: state.describe() for name, state in self._states.items()}

    def _changed(self, snapshot: KVSnapshot) -> None:
        if snapshot.stale:
            return  # the registry is away: keep what is in force
        docs: Mapping[str, tuple[str, int]] = snapshot.value  # type: ignore[assignment]
        for name in self.kind.names:
            self._consider(name, docs.get(self.kind.prefix + name))

    def _consider(self, name: str, doc: tuple[str, int] | None) -> None:
        kind, state = self.kind, self._states[name]
        if doc is None:
            if state.version != kind.default_version:
                log.info("%s: %s deleted; the default (%s) is in force", name, kind.what, kind.default_version)
                self._apply(name, DocumentState(kind.default(name), kind.default_version))
            return
        text, index = doc
        version = str(index)
        if version in (state.version, state.refused_version):
            return  # already in force, or already refused (and logged) once
        try:
            policy = kind.parse(name, text, version)
        except kind.refused as exc:
            log.warning("%s: %s version %s refused, keeping version %s: %s",
                        name, kind.what, version, state.version, exc)  # fmt: skip
            kind.metrics.rejected.labels(name).inc()
            kind.metrics.valid.labels(name).set(0)
            self._states[name] = DocumentState(state.policy, state.version, version, str(exc))
            return
        log.info("%s: %s version %s in force", name, kind.what, version)
        self._apply(name, DocumentState(policy, version))

    def _apply(self, name: str, state: DocumentState[P]) -> None:
        self._states[name] = state
        self.kind.metrics.valid.labels(name).set(1)
        self.kind.metrics.index.labels(name).set(int(state.version) if state.version.isdigit() else 0)
        callback = self._on_apply.get(name)
        if callback is not None:
            callback(state.policy)


# -- operators' side: the stored document as it is -------------------------------------------------


async def read_stored(client: RegistryClient, key: str) -> tuple[str | None, int]:
    """A KV document as stored: its text (None: no such key) and its ModifyIndex (0 without one)."""
    _, item = await client.call(f"kv get {key}", client.consul.kv.get(key))
    if item is None:
        return None, 0
    raw = item.get("Value") or b""
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)
    return text, int(item.get("ModifyIndex") or 0)


def shown(text: str | None) -> Any:
    """A stored document for display: its JSON, or its raw text when it is not JSON."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text
