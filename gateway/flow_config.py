"""The flows' live policies: the documents under `meshserve/config/`, each validated before use, the
last valid one kept when a new one is refused."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import Counter, Gauge

from meshserve.gateway.flow_policy import CONFIG_PREFIX, FLOWS, PolicyError
from meshserve.gateway.kv_documents import DocumentKind, DocumentMetrics, LiveDocuments
from meshserve.registry.config import RegistryConfig
from meshserve.registry.watch import WatchConfig

POLICY_VALID = Gauge("meshserve_gateway_policy_valid",
                     "1 while the flow's KV document is in force (or absent), 0 while it is refused", ["flow"])
POLICY_REJECTED = Counter("meshserve_gateway_policy_rejected_total",
                          "Policy documents refused as invalid (each version counted once)", ["flow"])
POLICY_INDEX = Gauge("meshserve_gateway_policy_modify_index",
                     "KV ModifyIndex of the policy in force (0: built-in defaults)", ["flow"])  # fmt: skip

FLOW_DOCUMENTS: DocumentKind[Any] = DocumentKind(
    prefix=CONFIG_PREFIX,
    names=tuple(FLOWS),
    parse=lambda flow, text, version: FLOWS[flow][0](text, version),
    refused=PolicyError,
    default=lambda flow: FLOWS[flow][1],
    default_version="default",
    what="policy document",
    metrics=DocumentMetrics(POLICY_VALID, POLICY_REJECTED, POLICY_INDEX),
)


class FlowConfigs(LiveDocuments[Any]):
    """The policy of every flow in FLOWS, kept current from Consul KV.

    `on_apply[flow](policy)` runs whenever a flow's policy in force changes.
    """

    def __init__(self, registry: RegistryConfig, watch_config: WatchConfig | None = None,
                 on_apply: Mapping[str, Callable[[Any], None]] | None = None):  # fmt: skip
        super().__init__(registry, FLOW_DOCUMENTS, watch_config, on_apply)
