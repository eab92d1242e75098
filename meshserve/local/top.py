"""`meshserve top`: a live table of the mesh read from every replica's /metrics, found through the registry.

No Prometheus needed: each frame lists the replicas of every `meshserve-*` service with their health
in Consul, scrapes the ones that registered a metrics port, and turns the difference from the
previous frame into rates and latency quantiles (the first frame shows totals since start).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from meshserve.registry.client import RegistryClient
from meshserve.registry.config import METRICS_PORT_META, METRICS_SCHEME_META, RegistryConfig
from meshserve.registry.prometheus_sd import mesh_services
from meshserve.rpc.tls_files import TlsFiles

Labels = frozenset[tuple[str, str]]
Samples = dict[tuple[str, Labels], float]  # (sample name, labels) → value
GATEWAY = "meshserve-gateway"
STAGES = ("validate", "detect", "embed", "search", "merge", "enrich")


@dataclass(frozen=True)
class Replica:
    service: str
    instance_id: str
    target: str  # host:port of its gRPC server
    health: str  # Consul's worst check status: passing, warning, critical
    version: str
    what: str  # the model it serves, or the shard for an indexer
    metrics: str | None  # host:metrics_port, None when it serves no /metrics
    metrics_scheme: str = "http"  # https: mTLS, read with a client certificate of the mesh CA


@dataclass
class Scrape:
    replica: Replica
    samples: Samples = field(default_factory=dict)
    error: str = ""  # why /metrics could not be read ("" when it was)


def _worst(checks: Iterable[Mapping[str, Any]]) -> str:
    order = {"passing": 0, "warning": 1, "critical": 2}
    statuses = [str(c.get("Status", "critical")) for c in checks] or ["critical"]
    return max(statuses, key=lambda s: order.get(s, 2))


def replica_from_entry(entry: Mapping[str, Any]) -> Replica:
    service, node = entry.get("Service") or {}, entry.get("Node") or {}
    address = str(service.get("Address") or node.get("Address") or "")
    host = f"[{address}]" if ":" in address else address
    meta = service.get("Meta") or {}
    port = str(meta.get(METRICS_PORT_META, ""))
    return Replica(service=str(service.get("Service", "")), instance_id=str(service.get("ID", "")),
                   target=f"{host}:{service.get('Port', 0)}", health=_worst(entry.get("Checks") or ()),
                   version=str(meta.get("version", "")), what=str(meta.get("shard") or meta.get("model") or ""),
                   metrics=f"{host}:{port}" if port.isdigit() else None,
                   metrics_scheme="https" if meta.get(METRICS_SCHEME_META) == "https" else "http")  # fmt: skip


async def list_replicas(client: RegistryClient) -> list[Replica]:
    """Every registered replica of every mesh service, passing or not."""
    names = await mesh_services(client)
    answers = await asyncio.gather(*(client.call(f"read {n}", client.consul.health.service(n)) for n in names))
    replicas = [replica_from_entry(e) for _, entries in answers for e in entries or ()]
    return sorted(replicas, key=lambda r: (r.service, r.instance_id))


def parse_samples(text: str) -> Samples:
    from prometheus_client.parser import text_string_to_metric_families

    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = float(sample.value)
    return samples


async def scrape(session: Any, replica: Replica, timeout_s: float) -> Scrape:
    import aiohttp

    result = Scrape(replica)
    if replica.metrics is None:
        result.error = "no metrics port"
        return result
    try:
        async with session.get(f"{replica.metrics_scheme}://{replica.metrics}/metrics",
                               timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:  # fmt: skip
            if resp.status != 200:
                result.error = f"HTTP {resp.status}"
                return result
            text = await resp.text()
        result.samples = parse_samples(text)
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
        result.error = type(exc).__name__
    return result


# -- figures from samples ----------------------------------------------------------------------


def total(samples: Samples, name: str, match: Callable[[dict[str, str]], bool] = lambda labels: True) -> float:
    return sum(v for (n, labels), v in samples.items() if n == name and match(dict(labels)))


def buckets(samples: Samples, name: str, match: Callable[[dict[str, str]], bool] = lambda labels: True
            ) -> dict[float, float]:  # fmt: skip
    """Cumulative bucket counts of histogram `name` (summed over the matching series) by upper bound."""
    found: dict[float, float] = defaultdict(float)
    for (n, labels), v in samples.items():
        if n == f"{name}_bucket":
            label_map = dict(labels)
            if match(label_map):
                found[float(label_map["le"])] += v
    return dict(found)


def quantile(q: float, cumulative: Mapping[float, float]) -> float:
    """Like PromQL's histogram_quantile: linear inside the bucket; NaN without observations."""
    bounds = sorted(cumulative)
    if not bounds or cumulative[bounds[-1]] <= 0:
        return math.nan
    rank = q * cumulative[bounds[-1]]
    lower_bound, lower_count = 0.0, 0.0
    for bound in bounds:
        count = cumulative[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            inside = count - lower_count
            return lower_bound + (bound - lower_bound) * ((rank - lower_count) / inside if inside else 1.0)
        lower_bound, lower_count = bound, count
    return bounds[-1]


def delta(now: Mapping[float, float], before: Mapping[float, float] | None) -> dict[float, float]:
    if not before:
        return dict(now)
    return {le: max(0.0, v - before.get(le, 0.0)) for le, v in now.items()}


@dataclass(frozen=True)
class Figures:
    """What one replica (or one stage) did: counters, and histogram buckets by name."""

    requests: float = 0.0
    errors: float = 0.0
    latency: Mapping[float, float] = field(default_factory=dict)


def replica_figures(scraped: Scrape) -> Figures:
    s = scraped.samples
    if scraped.replica.service == GATEWAY:
        return Figures(total(s, "meshserve_gateway_requests_total"),
                       total(s, "meshserve_gateway_requests_total", lambda la: la.get("code") != "OK"),
                       buckets(s, "meshserve_gateway_latency_seconds"))  # fmt: skip
    return Figures(total(s, "meshserve_server_requests_total"),
                   total(s, "meshserve_server_requests_total", lambda la: la.get("code") != "OK"),
                   buckets(s, "meshserve_server_latency_seconds", lambda la: la.get("method") == "Predict"))


# -- one frame ---------------------------------------------------------------------------------


@dataclass
class Frame:
    at: float
    scrapes: list[Scrape]
    stale: str = ""  # why the replica list is the last known one ("" when the registry answered)


def _ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1000:.1f}"


def _rate(now: float, before: float | None, dt: float | None) -> str:
    if before is None or not dt:
        return f"{now:.0f} tot"
    return f"{max(0.0, now - before) / dt:.1f}"


def render(frame: Frame, previous: Frame | None, registry: str) -> str:
    dt = frame.at - previous.at if previous else None
    before = {s.replica.instance_id: s for s in previous.scrapes} if previous else {}
    lines = [f"meshserve top — registry {registry} — {time.strftime('%H:%M:%S', time.localtime(frame.at))}"
             f"{'' if dt else ' (totals since start; rates from the next frame)'}", ""]
    if frame.stale:
        lines[-1:] = [f"STALE: {frame.stale}; showing the replicas it last listed", ""]
    header = f"{'SERVICE':<22} {'REPLICAS':>8}  {'VERSIONS':<28} {'REQ/S':>9} {'ERR/S':>9} {'P50 ms':>8} {'P99 ms':>8}"
    lines.append(header)
    by_service: dict[str, list[Scrape]] = defaultdict(list)
    for s in frame.scrapes:
        by_service[s.replica.service].append(s)
    for service, scrapes in sorted(by_service.items()):
        lines.append(_service_row(service, scrapes, before, dt))
    lines += ["", f"{'REPLICA':<46} {'MODEL/SHARD':<16} {'HEALTH':<9} {'REQ/S':>9}  METRICS"]
    for s in frame.scrapes:
        r, prior = s.replica, before.get(s.replica.instance_id)
        req_s = _rate(replica_figures(s).requests, replica_figures(prior).requests if prior else None, dt)
        lines.append(f"{r.instance_id[:46]:<46} {r.what[:16]:<16} {r.health:<9} {req_s:>9}  {s.error or 'ok'}")
    lines += _gateway_lines(frame, previous)
    return "\n".join(lines)


def _service_row(service: str, scrapes: list[Scrape], before: Mapping[str, Scrape], dt: float | None) -> str:
    """One service summed over its replicas; a replica new since the last frame adds no rate yet."""
    passing = sum(1 for s in scrapes if s.replica.health == "passing")
    versions = ",".join(sorted({s.replica.version for s in scrapes if s.replica.version}))
    req = err = req0 = err0 = 0.0
    latency: dict[float, float] = defaultdict(float)
    # an indexer serving several shards is registered once per shard: count its process once
    processes = {s.replica.metrics or s.replica.instance_id: s for s in scrapes}
    for s in processes.values():
        now = replica_figures(s)
        prior = before.get(s.replica.instance_id)
        old = replica_figures(prior) if prior is not None else None
        req, err = req + now.requests, err + now.errors
        req0, err0 = req0 + (old or now).requests, err0 + (old or now).errors
        for le, v in delta(now.latency, old.latency if old else None).items():
            latency[le] += v
    req_s = _rate(req, req0 if before else None, dt)
    err_s = _rate(err, err0 if before else None, dt)
    return (f"{service:<22} {f'{passing}/{len(scrapes)}':>8}  {versions[:28]:<28} {req_s:>9} {err_s:>9} "
            f"{_ms(quantile(0.5, latency)):>8} {_ms(quantile(0.99, latency)):>8}")  # fmt: skip


def _stage_is(stage: str) -> Callable[[dict[str, str]], bool]:
    return lambda labels: labels.get("stage") == stage


def _gateway_lines(frame: Frame, previous: Frame | None) -> list[str]:
    gateways = [s for s in frame.scrapes if s.replica.service == GATEWAY and s.samples]
    if not gateways:
        return ["", "(no gateway metrics)"]
    old = {s.replica.instance_id: s.samples for s in previous.scrapes} if previous else {}
    lines = ["", f"{'GATEWAY STAGE':<14} {'P50 ms':>8} {'P99 ms':>8}"]
    for stage in STAGES:
        hist: dict[float, float] = defaultdict(float)
        for g in gateways:
            now = buckets(g.samples, "meshserve_gateway_stage_seconds", _stage_is(stage))
            then = old.get(g.replica.instance_id)
            then_b = buckets(then, "meshserve_gateway_stage_seconds", _stage_is(stage)) if then is not None else None
            for le, v in delta(now, then_b).items():
                hist[le] += v
        lines.append(f"{stage:<14} {_ms(quantile(0.5, hist)):>8} {_ms(quantile(0.99, hist)):>8}")

    def change(name: str) -> float:
        return sum(total(g.samples, name) - total(old.get(g.replica.instance_id) or {}, name) for g in gateways)

    cov_sum, cov_count = change("meshserve_gateway_coverage_sum"), change("meshserve_gateway_coverage_count")
    coverage = f"{cov_sum / cov_count:.3f} over {cov_count:.0f} searches" if cov_count > 0 else "- (no searches)"
    shards = {dict(k[1]).get("state"): v for k, v in gateways[0].samples.items() if k[0] == "meshserve_gateway_shards"}
    stale = max(total(g.samples, "meshserve_gateway_registry_stale") for g in gateways)
    lines += ["", f"coverage {coverage}   shards passing {shards.get('passing', 0):.0f} missing "
              f"{shards.get('missing', 0):.0f}   routes {'STALE' if stale else 'fresh'}"]  # fmt: skip
    return lines


async def frames(config: RegistryConfig, interval_s: float, scrape_timeout_s: float = 2.0,
                 tls: TlsFiles | None = None, stop: asyncio.Event | None = None) -> Any:  # fmt: skip
    """Yield one Frame per interval until `stop` is set. While the registry does not answer, the replicas it
    last listed are still scraped (their /metrics do not depend on it) and the frame says it is stale.
    `tls`: the client certificate for replicas serving /metrics over mTLS."""
    import aiohttp

    from meshserve.registry.consul_http import RegistryUnavailable
    from meshserve.rpc.https import client_context

    stop = stop or asyncio.Event()
    replicas: list[Replica] | None = None
    connector = aiohttp.TCPConnector(ssl=client_context(tls) if tls is not None else True)
    async with RegistryClient(config) as client, aiohttp.ClientSession(connector=connector) as session:
        while not stop.is_set():
            began = time.monotonic()
            stale = ""
            try:
                replicas = await list_replicas(client)
            except RegistryUnavailable as exc:
                if replicas is None:  # never listed anything: nothing to show
                    raise
                stale = str(exc)
            scrapes = await asyncio.gather(*(scrape(session, r, scrape_timeout_s) for r in replicas))
            yield Frame(time.time(), list(scrapes), stale)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, interval_s - (time.monotonic() - began)))
