"""`meshserve status`: the mesh at a glance, read from the registry (Consul or the dev agent)."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any

from meshserve.errors import FailedPrecondition
from meshserve.gateway.admission import meta_problem, probe_identity
from meshserve.gateway.discovery import Registered, registered_from_health
from meshserve.gateway.flow_store import read_all
from meshserve.gateway.mesh_channels import MeshChannels
from meshserve.gateway.policy import HEDGE_META, HEDGE_SHARDS_META, default_policies
from meshserve.gateway.rollout_policy import ROLLOUT_SERVICES
from meshserve.gateway.rollout_run import load_run
from meshserve.gateway.rollout_store import StoredRollout, read_rollouts
from meshserve.registry.client import RegistryClient
from meshserve.registry.config import SERVICE_NAMES, RegistryConfig
from meshserve.registry.retired_shards import retired_shards
from meshserve.rpc.tls_files import TlsFiles


@dataclass(frozen=True)
class ReplicaStatus:
    id: str
    target: str
    status: str
    version: str
    meta: dict[str, str]
    ignored: str = ""  # why the gateway routes no traffic to it despite the registration ("" = routable)


@dataclass(frozen=True)
class ShardSet:
    index: str
    embedder_version: str
    shards: dict[str, dict[str, int]]  # shard → {"passing": n, "registered": n, "items": n}

    @property
    def coverage(self) -> float:
        return sum(1 for s in self.shards.values() if s["passing"]) / len(self.shards) if self.shards else 0.0


FILTERED_HEADER = "X-Consul-Results-Filtered-By-ACLs"


async def _health_and_filtered(client: RegistryClient, name: str) -> tuple[list[Any], bool]:
    """/v1/health/service/<name> and whether Consul says it left entries out for the token's ACLs."""
    from consul.callback import CB

    def keep_header(response: Any) -> tuple[list[Any], bool]:
        entries = CB.json()(response)
        return entries, str(response.headers.get(FILTERED_HEADER, "")).lower() == "true"

    consul = client.consul
    path = f"/v1/health/service/{name}"
    return await client.call(f"read {name}", consul.http.get(keep_header, path, headers=consul.prepare_headers()))


def acl_note(name: str, filtered: bool, token_used: bool) -> str:
    """What an empty answer means when ACLs may be why: never just "none registered"."""
    if filtered:
        return (f"hidden by registry ACLs: the token lacks service:read on {name} (or node:read); "
                "replicas may be registered")
    if token_used:
        return f"none visible with this token (none registered, or its ACLs lack service:read on {name})"
    return ""


async def _why_ignored(found: tuple[Registered, ...], tls: TlsFiles | None) -> list[str]:
    """The gateway's admission rules, asked from here: indexer meta, and under mTLS an identity probe of each
    passing replica (its certificate must name the service it registered as)."""
    channels = MeshChannels(tls) if tls is not None else None

    async def why(r: Registered) -> str:
        problem = meta_problem(r.instance)
        if problem is not None or channels is None or not r.passing:
            return problem or ""
        return await probe_identity(channels, r.instance) or ""

    return list(await asyncio.gather(*(why(r) for r in found)))


async def read_status(config: RegistryConfig, tls: TlsFiles | None = None) -> dict[str, Any]:
    services: dict[str, list[ReplicaStatus]] = {}
    registered: dict[str, tuple[Registered, ...]] = {}
    acl_notes: dict[str, str] = {}
    async with RegistryClient(config) as client:
        for role, name in SERVICE_NAMES.items():
            entries, filtered = await _health_and_filtered(client, name)
            registered[role] = registered_from_health(entries)
            if not entries and (note := acl_note(name, filtered, bool(config.token))):
                acl_notes[role] = note
        try:
            flows = await read_all(client)
        except FailedPrecondition as exc:  # the token may not read meshserve/config/: show the rest
            flows, acl_notes["flows"] = {}, str(exc)
        try:
            retired = await retired_shards(client)
        except FailedPrecondition as exc:  # the token may not read meshserve/shards/retired/
            retired, acl_notes["retired_shards"] = {}, str(exc)
        try:
            rollouts = await read_rollouts(client)
            runs = {service: await load_run(client, service) for service in ROLLOUT_SERVICES}
        except FailedPrecondition as exc:  # nor, perhaps, meshserve/rollout/
            rollouts, runs, acl_notes["rollouts"] = {}, {}, str(exc)
    for role, found in registered.items():
        ignored = await _why_ignored(found, tls)
        services[role] = [ReplicaStatus(r.instance.id, r.instance.target, r.status,
                                        r.instance.meta.get("version", ""), dict(r.instance.meta), why)
                          for r, why in zip(found, ignored, strict=True)]  # fmt: skip
    groups: dict[tuple[str, str], dict[str, dict[str, int]]] = defaultdict(dict)
    for r in registered["indexer"]:
        meta = r.instance.meta
        shard = groups[(meta.get("index", ""), meta.get("embedder_version", ""))].setdefault(
            meta.get("shard", ""), {"passing": 0, "registered": 0, "items": int(meta.get("count", "0") or 0)})
        shard["registered"] += 1
        shard["passing"] += int(r.passing)
    shard_sets = [ShardSet(index, version, dict(sorted(shards.items())))
                  for (index, version), shards in sorted(groups.items())]  # fmt: skip
    return {
        "registry": config.http_addr,
        "services": {role: [asdict(r) for r in replicas] for role, replicas in services.items()},
        "shard_sets": [{**asdict(s), "coverage": round(s.coverage, 4)} for s in shard_sets],
        "retired_shards": retired,
        "policies": {role: p.describe() for role, p in default_policies().items()},
        "flows": {flow: doc.describe() for flow, doc in flows.items()},
        "acl": acl_notes,
        "rollouts": {service: {**doc.describe(), "candidate_blocked": _candidate_blocked(doc, services, shard_sets),
                               "run": _run_summary(runs[service])}
                     for service, doc in rollouts.items() if doc.text is not None},
    }


def _run_summary(run: Any) -> dict[str, Any] | None:
    if run is None:
        return None
    last = run.events[-1] if run.events else {}
    return {"version": run.version, "status": run.status, "canary_percent": run.canary_percent,
            "last_decision": last.get("decision"), "last_reasons": last.get("reasons", [])}  # fmt: skip


def _candidate_blocked(doc: StoredRollout, services: dict[str, list[ReplicaStatus]],
                       shard_sets: list[ShardSet]) -> str | None:  # fmt: skip
    """Why the candidate of an embedder rollout gets no traffic (None: nothing stops it): its
    vectors are only served with a complete shard set of its own version."""
    policy = doc.policy
    if doc.service != "embedder" or policy is None or policy.candidate is None:
        return None
    version = policy.candidate.version
    if not any(r.version == version and r.status == "passing" for r in services["embedder"]):
        return f"no passing embedder of version {version}"
    sets = [s for s in shard_sets if s.embedder_version == version]
    if not sets:
        return f"no shards built for embedder version {version}"
    if not any(s.coverage == 1.0 for s in sets):
        return f"shard set of embedder version {version} incomplete (coverage {max(s.coverage for s in sets):.2f})"
    return None


def render(status: dict[str, Any]) -> str:
    lines = [f"registry {status['registry']}", ""]
    lines.append(f"{'SERVICE':<12} {'STATUS':<9} {'VERSION':<22} {'TARGET':<22} ID  PROTOCOLS")
    for role, replicas in status["services"].items():
        if not replicas:
            why = status.get("acl", {}).get(role) or "none registered"
            lines.append(f"{role:<12} {'-':<9} {'':<22} {'':<22} ({why})")
        for r in replicas:
            lines.append(f"{role:<12} {r['status']:<9} {r['version']:<22} {r['target']:<22} {r['id']}"
                         f"  {protocols(r['meta'])}")  # fmt: skip
            if r.get("ignored"):
                lines.append(f"{'':<12} IGNORED by the gateway: {r['ignored']}")
            if role == "gateway":
                lines.append(f"{'':<12} hedges: detector/embedder {_hedge(r['meta'], HEDGE_META)}, "
                             f"shard calls {_hedge(r['meta'], HEDGE_SHARDS_META)}")  # fmt: skip
    lines.append("")
    if not status["shard_sets"]:
        lines.append("no shards registered")
    for shard_set in status["shard_sets"]:
        lines.append(f"index {shard_set['index']} · embedder {shard_set['embedder_version']} · "
                     f"coverage {shard_set['coverage']:.2f}")  # fmt: skip
        for shard, counts in shard_set["shards"].items():
            state = "ok" if counts["passing"] else "MISSING"
            lines.append(f"  {shard:<16} {counts['passing']}/{counts['registered']} passing  "
                         f"{counts['items']:>6} items  {state}")  # fmt: skip
    if status.get("retired_shards"):
        lines.append("retired (KV meshserve/shards/retired/<shard>; no indexer registers them until published again)")
    for shard, mark in status.get("retired_shards", {}).items():
        when = mark.get("retired_at")
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(when)) if isinstance(when, (int, float)) else "?"
        lines.append(f"  {shard:<16} since {since}")
    lines.append("")
    lines.append("call policies (the defaults; each gateway's hedges are on its row above)")
    for role, policy in status["policies"].items():
        described = ", ".join(f"{k}={v}" for k, v in policy.items())
        lines.append(f"  {role:<11} {described}")
    lines.append("")
    lines.append("flow policies (KV meshserve/config/<flow>)")
    for flow, doc in status.get("flows", {}).items():
        state = "valid" if doc["valid"] else f"REFUSED, the gateway keeps the last valid one: {doc['error']}"
        lines.append(f"  {flow:<14} version {doc['version']:<8} {state}")
    if status.get("acl", {}).get("flows"):
        lines.append(f"  (not readable: {status['acl']['flows']})")
    if status.get("rollouts"):
        lines.append("")
        lines.append("rollouts (KV meshserve/rollout/<service>; versions not named get no traffic)")
    for service, doc in status.get("rollouts", {}).items():
        if not doc["valid"]:
            lines.append(f"  {service:<14} REFUSED, the gateway keeps the last valid one: {doc['error']}")
            continue
        d = doc["document"]
        c = d.get("candidate") or {}
        split = (f"candidate {c['version']} canary {c.get('canary_percent', 0):g}% "
                 f"ab {(c.get('ab') or {}).get('percent', 0):g}% shadow {c.get('shadow_percent', 0):g}%"
                 if c else "no candidate")  # fmt: skip
        blocked = f" · candidate gets nothing: {doc['candidate_blocked']}" if doc["candidate_blocked"] else ""
        lines.append(f"  {service:<14} stable {d['stable']} · {split}{blocked}")
        if run := doc.get("run"):
            lines.append(f"  {'':<14} rollout of {run['version']}: {run['status']}, last decision "
                         f"{run['last_decision']} ({'; '.join(run['last_reasons'])})")  # fmt: skip
    return "\n".join(lines)


def _hedge(meta: dict[str, str], key: str) -> str:
    return f"after {meta[key]} ms" if meta.get(key) else "off"


def protocols(meta: dict[str, str]) -> str:
    """What a replica speaks (registry meta `protocols`, "-" when it does not say), with its OIP
    HTTP port when it has one."""
    spoken = meta.get("protocols") or "-"
    scheme = "https" if meta.get("http_scheme") == "https" else "http"
    return f"{spoken} ({scheme} :{meta['http_port']})" if meta.get("http_port") else spoken
