"""The dev agent's catalog: services, checks, KV, Raft-like indexes and what wakes blocking queries."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from meshserve.registry.dev.notify import Notifier
from meshserve.registry.dev.schema import BadRequest, CheckDef, ServiceDef
from meshserve.registry.dev.server_info import CONSUL_SERVICE, consul_service

log = logging.getLogger(__name__)

SERF_CHECK_ID = "serfHealth"
NODE_MAINT_ID = "_node_maintenance"
SERVICE_MAINT_PREFIX = "_service_maintenance:"
CATALOG_TOPIC = "catalog"
CHECKS_TOPIC = "checks"  # any check or service changed (reads over every check block on it)
# Indexes handed out may run this far ahead of the last save; a restart resumes above it,
# so an index a client has seen never comes back smaller, even after a SIGKILL.
INDEX_RESERVE = 10_000
MAX_TOMBSTONES = 10_000


class NotFoundError(Exception):
    """Consul answers 404 with this message."""


class ServerError(Exception):
    """Consul answers 500 with this message."""


@dataclass
class CheckState:
    definition: CheckDef
    status: str
    output: str
    create_index: int
    modify_index: int
    critical_since: float | None = None
    successes: int = 0
    failures: int = 0

    def reset_counters(self) -> None:
        # Like Consul's StatusHandler, the counters start at their thresholds, so the first
        # result applies at once; the thresholds only damp changes after that.
        self.successes = self.definition.success_before_passing
        self.failures = self.definition.failures_before_critical

    @property
    def check_id(self) -> str:
        return self.definition.check_id

    @property
    def service_id(self) -> str:
        return self.definition.service_id


@dataclass
class ServiceState:
    definition: ServiceDef
    create_index: int
    modify_index: int


@dataclass
class KVEntry:
    key: str
    value: bytes | None
    flags: int
    create_index: int
    modify_index: int


@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    name: str
    address: str
    datacenter: str = "dc1"


class CheckListener(Protocol):
    def check_added(self, check: CheckState) -> None: ...
    def check_removed(self, check_id: str) -> None: ...


@dataclass
class HealthEntry:
    service: ServiceState
    checks: list[CheckState] = field(default_factory=list)


class DevState:
    """Everything the agent knows. Mutations bump the index and wake the right waiters."""

    def __init__(self, node: NodeInfo, min_deregister_after: float = 60.0):
        self.node = node
        self.min_deregister_after = min_deregister_after
        self.notifier = Notifier()
        self.index = 1
        self.services: dict[str, ServiceState] = {}
        self.checks: dict[str, CheckState] = {}
        self.kv: dict[str, KVEntry] = {}
        self.tombstones: dict[str, int] = {}
        self.tombstone_floor = 0
        self.service_index: dict[str, int] = {}
        self.extinction_index = 1
        self.catalog_index = 1
        self.kv_index = 1
        self.listeners: list[CheckListener] = []
        # The server's own catalog entry: listed and healthy like any service, never a local one
        # (not in agent/services, not saved, not deregistrable).
        self.consul = ServiceState(consul_service(node), 1, 1)
        self.service_index[CONSUL_SERVICE] = 1
        self.on_change: Callable[[], None] = lambda: None  # persistence hook
        self._add_check(CheckDef(check_id=SERF_CHECK_ID, name="Serf Health Status", kind="serf",
                                 status="passing"), output="Agent alive and reachable")

    # ---- indexes -------------------------------------------------------------------------------

    def _bump(self) -> int:
        self.index += 1
        self.on_change()
        return self.index

    def bump_index(self) -> int:
        """A fresh Raft-like index for changes kept outside this state (the ACL store's)."""
        return self._bump()

    def _touch_service_name(self, name: str, idx: int) -> None:
        if name == CONSUL_SERVICE or any(s.definition.name == name for s in self.services.values()):
            self.service_index[name] = idx
        elif self.service_index.pop(name, None) is not None:
            self.extinction_index = idx
        self.notifier.notify(("svc", name))
        self.notifier.notify(CHECKS_TOPIC)

    def _touch_for_check(self, check: CheckState, idx: int) -> None:
        if check.service_id:
            svc = self.services.get(check.service_id)
            if svc is not None:
                self._touch_service_name(svc.definition.name, idx)
        else:  # a node check changes the health of every service on the node
            for name in {CONSUL_SERVICE, *(s.definition.name for s in self.services.values())}:
                self._touch_service_name(name, idx)

    def health_index(self, name: str) -> int:
        return max(1, self.service_index.get(name, self.extinction_index))

    def checks_index(self) -> int:
        """The index of reads over every check (health by state or by node)."""
        return max(1, self.extinction_index, *self.service_index.values())

    # ---- checks --------------------------------------------------------------------------------

    def _add_check(self, definition: CheckDef, output: str = "") -> CheckState:
        idx = self.index
        status = definition.status or "critical"
        previous = self.checks.get(definition.check_id)
        if previous is not None and previous.definition.kind == definition.kind:
            # Re-registering the same check keeps what is known about it, so an idempotent
            # re-register does not flap the instance to critical.
            status, output = previous.status, previous.output
        state = CheckState(definition, status, output, create_index=idx, modify_index=idx,
                           critical_since=time.monotonic() if status == "critical" else None)
        state.reset_counters()
        if previous is not None:
            state.create_index = previous.create_index
            state.critical_since = previous.critical_since if status == "critical" else None
            self._drop_check(definition.check_id)
        self.checks[definition.check_id] = state
        for listener in self.listeners:
            listener.check_added(state)
        return state

    def _drop_check(self, check_id: str) -> CheckState | None:
        state = self.checks.pop(check_id, None)
        if state is not None:
            for listener in self.listeners:
                listener.check_removed(check_id)
        return state

    def set_check_status(self, check_id: str, status: str, output: str) -> bool:
        """Record a check's new status/output; bumps indexes only when something changed."""
        check = self.checks.get(check_id)
        if check is None:
            return False
        output = output[: max(check.definition.output_max_size, 1)]
        if check.status == status and check.output == output:
            return False
        if status == "critical" and check.status != "critical":
            check.critical_since = time.monotonic()
        elif status != "critical":
            check.critical_since = None
        check.status, check.output = status, output
        idx = self._bump()
        check.modify_index = idx
        self._touch_for_check(check, idx)
        return True

    def record_result(self, check_id: str, ok_status: str, output: str) -> None:
        """A probe result through Consul's thresholds (SuccessBeforePassing, FailuresBefore*)."""
        check = self.checks.get(check_id)
        if check is None:
            return
        d = check.definition
        if ok_status in ("passing", "warning"):
            check.successes += 1
            check.failures = 0
            if check.successes >= d.success_before_passing:
                self.set_check_status(check_id, ok_status, output)
            return
        check.failures += 1
        check.successes = 0
        if check.failures >= d.failures_before_critical:
            self.set_check_status(check_id, "critical", output)
        elif check.failures >= d.failures_before_warning:
            self.set_check_status(check_id, "warning", output)

    def update_ttl(self, check_id: str, status: str, note: str) -> None:
        check = self.checks.get(check_id)
        if check is None:
            raise NotFoundError(
                f'Unknown check ID "{check_id}". Ensure that the check ID is passed, not the check name.'
            )
        if check.definition.kind != "ttl":
            raise ServerError(f'CheckID "{check_id}" does not have associated TTL')
        self.set_check_status(check_id, status, note)
        for listener in self.listeners:
            listener.check_added(check)  # restarts the TTL timer

    # ---- services ------------------------------------------------------------------------------

    def register_service(self, service: ServiceDef, checks: list[CheckDef],
                         replace_existing_checks: bool = False) -> None:
        for check in checks:
            other = self.checks.get(check.check_id)
            if other is not None and other.service_id != service.service_id:
                raise BadRequest(f"Check ID {check.check_id!r} already belongs to another service")
        previous = self.services.get(service.service_id)
        if previous is not None and self._same_registration(service, checks, replace_existing_checks):
            # Like Consul's catalog, an identical re-registration changes nothing (no index
            # bump, no watcher woken); the check runners restart as they would in Consul.
            for check in checks:
                for listener in self.listeners:
                    listener.check_added(self.checks[check.check_id])
            return
        idx = self._bump()
        create = previous.create_index if previous else idx
        self.services[service.service_id] = ServiceState(service, create, idx)
        new_ids = {c.check_id for c in checks}
        for check_id in [cid for cid, c in self.checks.items() if c.service_id == service.service_id]:
            if check_id in new_ids:
                continue
            if replace_existing_checks and not check_id.startswith(SERVICE_MAINT_PREFIX):
                self._drop_check(check_id)
        for check in checks:
            self._add_check(check)
        self.catalog_index = idx
        if previous and previous.definition.name != service.name:
            self._touch_service_name(previous.definition.name, idx)
        self._touch_service_name(service.name, idx)
        self.notifier.notify(CATALOG_TOPIC)

    def _same_registration(self, service: ServiceDef, checks: list[CheckDef],
                           replace_existing_checks: bool) -> bool:
        if self.services[service.service_id].definition != service:
            return False
        if any(self.checks.get(c.check_id) is None or self.checks[c.check_id].definition != c
               for c in checks):
            return False
        if replace_existing_checks:
            wanted = {c.check_id for c in checks}
            return all(cid in wanted or cid.startswith(SERVICE_MAINT_PREFIX)
                       for cid, c in self.checks.items() if c.service_id == service.service_id)
        return True

    def deregister_service(self, service_id: str) -> None:
        svc = self.services.get(service_id)
        if svc is None:
            raise NotFoundError(f'Unknown service ID "{service_id}"')
        idx = self._bump()
        del self.services[service_id]
        for check_id in [cid for cid, c in self.checks.items() if c.service_id == service_id]:
            self._drop_check(check_id)
        self.catalog_index = idx
        self._touch_service_name(svc.definition.name, idx)
        self.notifier.notify(CATALOG_TOPIC)

    def service_maintenance(self, service_id: str, enable: bool, reason: str) -> None:
        svc = self.services.get(service_id)
        if svc is None:
            raise NotFoundError(f'No service registered with ID "{service_id}"')
        check_id = SERVICE_MAINT_PREFIX + service_id
        if enable == (check_id in self.checks):
            return
        idx = self._bump()
        if enable:
            notes = reason or ("Maintenance mode is enabled for this service, but no reason was "
                               "provided. This is a default message.")
            self._add_check(CheckDef(check_id=check_id, name="Service Maintenance Mode",
                                     kind="maintenance", service_id=service_id, notes=notes,
                                     status="critical")).modify_index = idx
        else:
            self._drop_check(check_id)
        self._touch_service_name(svc.definition.name, idx)

    def node_maintenance(self, enable: bool, reason: str) -> None:
        if enable == (NODE_MAINT_ID in self.checks):
            return
        idx = self._bump()
        if enable:
            notes = reason or ("Maintenance mode is enabled for this node, but no reason was "
                               "provided. This is a default message.")
            added = self._add_check(CheckDef(check_id=NODE_MAINT_ID, name="Node Maintenance Mode",
                                             kind="maintenance", notes=notes, status="critical"))
            added.modify_index = idx
            self._touch_for_check(added, idx)
        else:
            dropped = self._drop_check(NODE_MAINT_ID)
            if dropped is not None:
                self._touch_for_check(dropped, idx)

    def register_check(self, check: CheckDef) -> None:
        if check.service_id and check.service_id not in self.services:
            raise ServerError(f'ServiceID "{check.service_id}" does not exist')
        idx = self._bump()
        state = self._add_check(check)
        state.modify_index = idx
        self._touch_for_check(state, idx)

    def deregister_check(self, check_id: str) -> None:
        if check_id not in self.checks or check_id == SERF_CHECK_ID:
            raise NotFoundError(f'Unknown check ID "{check_id}". Ensure that the check ID is '
                                "passed, not the check name.")
        idx = self._bump()
        state = self._drop_check(check_id)
        assert state is not None
        self._touch_for_check(state, idx)

    def reap(self) -> list[str]:
        """Deregister services whose check has been critical longer than its DeregisterCritical…After."""
        now = time.monotonic()
        doomed = []
        for check in self.checks.values():
            d = check.definition
            if not d.deregister_after or not d.service_id or check.critical_since is None:
                continue
            after = max(d.deregister_after, self.min_deregister_after)
            if now - check.critical_since >= after and d.service_id in self.services:
                doomed.append(d.service_id)
        for service_id in dict.fromkeys(doomed):
            log.info("reaping service %s: its check stayed critical past its deregister timeout",
                     service_id)
            self.deregister_service(service_id)
        return doomed

    # ---- reads ---------------------------------------------------------------------------------

    def node_checks(self) -> list[CheckState]:
        return [c for c in self.checks.values() if not c.service_id]

    def health(self, name: str) -> tuple[int, list[HealthEntry]]:
        node_checks = self.node_checks()
        entries = [HealthEntry(self.consul, node_checks)] if name == CONSUL_SERVICE else []
        for svc in sorted(self.services.values(), key=lambda s: s.definition.service_id):
            if svc.definition.name != name:
                continue
            own = [c for c in self.checks.values() if c.service_id == svc.definition.service_id]
            entries.append(HealthEntry(svc, node_checks + own))
        return self.health_index(name), entries

    def catalog_services(self) -> tuple[int, dict[str, list[str]]]:
        out: dict[str, list[str]] = {CONSUL_SERVICE: []}
        for svc in self.services.values():
            tags = out.setdefault(svc.definition.name, [])
            tags.extend(t for t in svc.definition.tags if t not in tags)
        return max(1, self.catalog_index), out

    # ---- KV ------------------------------------------------------------------------------------

    def kv_get(self, key: str) -> tuple[int, KVEntry | None]:
        entry = self.kv.get(key)
        if entry is None:
            return max(1, self.kv_index), None
        return max(1, entry.modify_index), entry

    def kv_list(self, prefix: str) -> tuple[int, list[KVEntry]]:
        entries = sorted((e for k, e in self.kv.items() if k.startswith(prefix)), key=lambda e: e.key)
        if not prefix:
            return max(1, self.kv_index), entries
        idx = max([e.modify_index for e in entries]
                  + [i for k, i in self.tombstones.items() if k.startswith(prefix)]
                  + [self.tombstone_floor], default=0)
        return max(1, idx or self.kv_index), entries

    def kv_put(self, key: str, value: bytes | None, flags: int | None, cas: int | None) -> bool:
        entry = self.kv.get(key)
        if cas is not None:
            if cas == 0 and entry is not None:
                return False
            if cas != 0 and (entry is None or entry.modify_index != cas):
                return False
        idx = self._bump()
        if entry is None:
            self.kv[key] = KVEntry(key, value, flags or 0, idx, idx)
        else:
            # Like Consul, a PUT without ?flags sets them to 0.
            entry.value, entry.modify_index, entry.flags = value, idx, flags or 0
        self.tombstones.pop(key, None)
        self.kv_index = idx
        self.notifier.notify_kv(key)
        return True

    def kv_delete(self, key: str, recurse: bool, cas: int | None) -> bool:
        if recurse:
            doomed = [k for k in self.kv if k.startswith(key)]
        else:
            entry = self.kv.get(key)
            if cas is not None and (cas == 0 or entry is None or entry.modify_index != cas):
                return False
            doomed = [key] if entry is not None else []
        if not doomed:
            return True
        idx = self._bump()
        for k in doomed:
            del self.kv[k]
            self.tombstones[k] = idx
            self.notifier.notify_kv(k)
        self.kv_index = idx
        if len(self.tombstones) > MAX_TOMBSTONES:
            # Forget the oldest deletes but keep their index as a floor for every prefix, so a
            # prefix's index can only show a spurious change, never go backwards.
            for k in sorted(self.tombstones, key=self.tombstones.__getitem__)[: MAX_TOMBSTONES // 2]:
                self.tombstone_floor = max(self.tombstone_floor, self.tombstones.pop(k))
        return True

    # ---- persistence ---------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        import base64

        return {
            "version": 1,
            "index": self.index,
            "index_reserved": self.index + INDEX_RESERVE,
            "node_id": self.node.node_id,
            "extinction_index": self.extinction_index,
            "catalog_index": self.catalog_index,
            "kv_index": self.kv_index,
            "service_index": self.service_index,
            "services": [{"def": s.definition.to_json(), "create": s.create_index,
                          "modify": s.modify_index} for s in self.services.values()],
            "checks": [{"def": c.definition.to_json(), "status": c.status, "output": c.output,
                        "create": c.create_index, "modify": c.modify_index}
                       for c in self.checks.values() if c.check_id != SERF_CHECK_ID],
            "kv": [{"key": e.key, "flags": e.flags, "create": e.create_index,
                    "modify": e.modify_index,
                    "value": None if e.value is None else base64.b64encode(e.value).decode()}
                   for e in self.kv.values()],
            "tombstones": self.tombstones,
            "tombstone_floor": self.tombstone_floor,
        }

    def restore(self, data: dict[str, Any]) -> None:
        """Load a snapshot: indexes resume above anything handed out before the restart."""
        import base64

        self.index = int(data["index_reserved"])
        self.extinction_index = int(data["extinction_index"])
        self.catalog_index = int(data["catalog_index"])
        self.kv_index = int(data["kv_index"])
        self.service_index = {str(k): int(v) for k, v in data["service_index"].items()}
        for raw in data["services"]:
            svc = ServiceDef.from_json(raw["def"])
            self.services[svc.service_id] = ServiceState(svc, raw["create"], raw["modify"])
        now = time.monotonic()
        for raw in data["checks"]:
            d = CheckDef.from_json(raw["def"])
            d = replace(d, header={k: list(v) for k, v in d.header.items()})
            if d.kind == "ttl" or d.kind == "maintenance":
                # Like Consul, only TTL state survives; probed checks start over.
                status, output = raw["status"], raw["output"]
            else:
                status, output = d.status or "critical", ""
            state = CheckState(d, status, output, raw["create"], raw["modify"],
                               critical_since=now if status == "critical" else None)
            state.reset_counters()
            self.checks[d.check_id] = state
        for raw in data["kv"]:
            value = None if raw["value"] is None else base64.b64decode(raw["value"])
            self.kv[raw["key"]] = KVEntry(raw["key"], value, raw["flags"], raw["create"], raw["modify"])
        self.tombstones = {str(k): int(v) for k, v in data["tombstones"].items()}
        self.tombstone_floor = int(data.get("tombstone_floor", 0))

    def start_listeners(self) -> None:
        """Tell the check runners about every check (after a restore)."""
        for check in list(self.checks.values()):
            for listener in self.listeners:
                listener.check_added(check)
