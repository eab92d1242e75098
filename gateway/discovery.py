"""What the gateway knows of the registry: every registered replica of each service, with its health.

One blocking watch per service, without Consul's `?passing` filter: the gateway needs the
registered set too, because a registered shard with no passing replica is *expected but
missing* (it lowers coverage) while a deregistered shard is gone on purpose. Passing is judged
here by Consul's own rule: every check, node checks included, exactly `passing`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from meshserve.registry.config import RegistryConfig
from meshserve.registry.instances import Instance, instance_from_entry
from meshserve.registry.watch import ServiceSnapshot, ServiceWatch, WatchConfig


@dataclass(frozen=True)
class Registered:
    """One registered replica and whether Consul would call it passing."""

    instance: Instance
    passing: bool
    status: str  # passing | warning | critical (the worst of its checks)


def worst_status(checks: list[Mapping[str, Any]]) -> str:
    statuses = {str(check.get("Status", "critical")) for check in checks}
    for status in ("critical", "warning", "maintenance"):
        if status in statuses:
            return "critical" if status == "maintenance" else status
    return "passing"


def registered_from_health(data: Any) -> tuple[Registered, ...]:
    entries = data or []
    out = []
    for entry in entries:
        status = worst_status(entry.get("Checks") or [])
        out.append(Registered(instance_from_entry(entry), status == "passing", status))
    return tuple(sorted(out, key=lambda r: r.instance.id))


class RegisteredWatch(ServiceWatch):
    """Every registered instance of a service with its health (ServiceWatch without ?passing)."""

    kind = "service-registered"  # its own parse-cache and metrics label

    def __init__(
        self,
        config: RegistryConfig,
        service: str,
        watch_config: WatchConfig | None = None,
        on_change: Callable[[ServiceSnapshot], Awaitable[None] | None] | None = None,
    ):
        super().__init__(config, service, watch_config, on_change)

    def _request(self) -> tuple[str, list[tuple[str, Any]]]:
        return f"/v1/health/service/{self.service}", []

    def _parse(self, data: Any) -> tuple[Registered, ...]:  # type: ignore[override]
        return registered_from_health(data)

    @property
    def registered(self) -> tuple[Registered, ...]:
        return self._snapshot.value  # type: ignore[return-value]
