"""The rollout policies in Consul KV: watched live by the gateway (each document validated, the last
valid one kept when a new one is refused), and read / written with check-and-set by operators."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter, Gauge

from meshserve.errors import FailedPrecondition
from meshserve.gateway.kv_documents import DocumentKind, DocumentMetrics, LiveDocuments, read_stored, shown
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
from meshserve.registry.watch import WatchConfig

ROLLOUT_VALID = Gauge("meshserve_gateway_rollout_policy_valid",
                      "1 while the service's rollout document is in force (or absent), 0 while refused", ["service"])
ROLLOUT_REJECTED = Counter("meshserve_gateway_rollout_policy_rejected_total",
                           "Rollout documents refused as invalid (each version counted once)", ["service"])
ROLLOUT_INDEX = Gauge("meshserve_gateway_rollout_policy_modify_index",
                      "KV ModifyIndex of the rollout policy in force (0: none)", ["service"])  # fmt: skip

# without a document a service has no policy: every passing version is eligible
ROLLOUT_DOCUMENTS: DocumentKind[RolloutPolicy | None] = DocumentKind(
    prefix=ROLLOUT_PREFIX,
    names=ROLLOUT_SERVICES,
    parse=parse_rollout,
    refused=RolloutPolicyError,
    default=lambda service: None,
    default_version="none",
    what="rollout policy",
    metrics=DocumentMetrics(ROLLOUT_VALID, ROLLOUT_REJECTED, ROLLOUT_INDEX),
)


class RolloutPolicies(LiveDocuments[RolloutPolicy | None]):
    """Every service's rollout policy, kept current from `meshserve/rollout/`."""

    def __init__(self, registry: RegistryConfig, watch_config: WatchConfig | None = None):
        super().__init__(registry, ROLLOUT_DOCUMENTS, watch_config)

    def policy(self, service: str) -> RolloutPolicy | None:
        state = self._states.get(service)
        return state.policy if state else None


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
        return {"service": self.service, "key": rollout_key(self.service), "modify_index": self.modify_index,
                "valid": self.error is None, "error": self.error, "document": shown(self.text)}  # fmt: skip


async def read_rollout(client: RegistryClient, service: str) -> StoredRollout:
    text, modify_index = await read_stored(client, rollout_key(service))
    if text is None:
        return StoredRollout(service, None, 0, None)
    try:
        parse_rollout(service, text)
        error = None
    except RolloutPolicyError as exc:
        error = str(exc)
    return StoredRollout(service, text, modify_index, error)


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
