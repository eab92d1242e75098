"""Rollout analysis: the gateways' per-version figures scraped from their Prometheus endpoints, the
window between two scrapes, and the verdict on a candidate (step up, roll back, or wait for data)."""

from __future__ import annotations

import asyncio
import math
import ssl
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from meshserve.gateway.rollout_policy import CANDIDATE_ARMS, Analysis
from meshserve.registry.client import RegistryClient
from meshserve.registry.config import METRICS_PORT_META, METRICS_SCHEME_META, SERVICE_NAMES, RegistryConfig

STEP, ROLLBACK, WAIT = "step", "rollback", "wait"


@dataclass
class Figures:
    """Cumulative counts of one version as the gateways report them (summed over gateways)."""

    requests: float = 0.0
    errors: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)  # le → cumulative count
    shadow_calls: float = 0.0
    shadow_failures: float = 0.0
    agreement_sum: float = 0.0
    agreement_count: float = 0.0

    def minus(self, before: Figures) -> Figures:
        return Figures(
            self.requests - before.requests, self.errors - before.errors,
            {le: n - before.buckets.get(le, 0.0) for le, n in self.buckets.items()},
            self.shadow_calls - before.shadow_calls, self.shadow_failures - before.shadow_failures,
            self.agreement_sum - before.agreement_sum, self.agreement_count - before.agreement_count,
        )  # fmt: skip

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    @property
    def shadow_error_rate(self) -> float | None:
        return self.shadow_failures / self.shadow_calls if self.shadow_calls else None

    @property
    def agreement(self) -> float | None:
        return self.agreement_sum / self.agreement_count if self.agreement_count else None

    def p99(self) -> float | None:
        """The bucket bound under which 99 % of the window's calls finished (Prometheus-style)."""
        total = self.buckets.get(math.inf, 0.0)
        if total <= 0:
            return None
        for le in sorted(self.buckets):
            if self.buckets[le] >= 0.99 * total:
                return le if math.isfinite(le) else max((b for b in self.buckets if math.isfinite(b)), default=le)
        return None

    def describe(self) -> dict[str, Any]:
        rounded = lambda v: None if v is None else round(v, 4)  # noqa: E731
        return {"requests": int(self.requests), "errors": int(self.errors), "error_rate": rounded(self.error_rate),
                "p99_s": rounded(self.p99()), "shadow_calls": int(self.shadow_calls),
                "shadow_error_rate": rounded(self.shadow_error_rate), "agreement": rounded(self.agreement)}


# (version, "stable" | "candidate") → figures
Snapshot = dict[tuple[str, str], Figures]


def parse_metrics(text: str, service: str, snapshot: Snapshot | None = None) -> Snapshot:
    """Add one gateway's exposition text for `service` into `snapshot` (per version and side)."""
    out: Snapshot = snapshot if snapshot is not None else defaultdict(Figures)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if labels.get("service") != service:
                continue
            version = labels.get("version", "")
            side = "candidate" if labels.get("arm") in CANDIDATE_ARMS else "stable"
            name = sample.name
            if name == "meshserve_gateway_version_requests_total":
                figures = out[(version, side)]
                figures.requests += sample.value
                if labels.get("outcome") == "error":
                    figures.errors += sample.value
            elif name == "meshserve_gateway_version_latency_seconds_bucket":
                buckets = out[(version, side)].buckets
                le = float(labels["le"])
                buckets[le] = buckets.get(le, 0.0) + sample.value
            elif name == "meshserve_gateway_shadow_requests_total":
                figures = out[(version, "shadow")]
                if labels.get("outcome") in ("compared", "failed"):
                    figures.shadow_calls += sample.value
                if labels.get("outcome") == "failed":
                    figures.shadow_failures += sample.value
            elif name.startswith("meshserve_gateway_shadow_agreement") and labels.get("measure") == "agreement":
                figures = out[(version, "shadow")]
                if name.endswith("_sum"):
                    figures.agreement_sum += sample.value
                elif name.endswith("_count"):
                    figures.agreement_count += sample.value
    return out


async def gateway_metrics_urls(registry: RegistryConfig) -> list[str]:
    """Every registered gateway's metrics endpoint (registry meta `metrics_port`), healthy or not:
    a gateway that cannot serve one flow still counts the calls of the other."""
    async with RegistryClient(registry) as client:
        _, entries = await client.call("read gateways", client.consul.health.service(SERVICE_NAMES["gateway"]))
    urls = []
    for entry in entries or ():
        service = entry.get("Service") or {}
        meta = service.get("Meta") or {}
        port, scheme = meta.get(METRICS_PORT_META), "https" if meta.get(METRICS_SCHEME_META) == "https" else "http"
        address = service.get("Address") or (entry.get("Node") or {}).get("Address") or "127.0.0.1"
        if port:
            urls.append(f"{scheme}://{address}:{port}/metrics")
    return sorted(set(urls))


def _fetch(url: str, timeout_s: float, tls: ssl.SSLContext | None) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s, context=tls) as resp:
            return resp.read().decode()  # type: ignore[no-any-return]
    except OSError:
        return None  # a gateway that went away: the others still tell


async def scrape(urls: list[str], service: str, timeout_s: float = 3.0,
                 tls: ssl.SSLContext | None = None) -> tuple[Snapshot, int]:  # fmt: skip
    """The summed figures of `service` over `urls`, and how many gateways answered (`tls`: the client side of
    https:// ones, which want a certificate of the mesh CA)."""
    texts = await asyncio.gather(*(asyncio.to_thread(_fetch, url, timeout_s, tls) for url in urls))
    snapshot: Snapshot = defaultdict(Figures)
    answered = 0
    for text in texts:
        if text is not None:
            parse_metrics(text, service, snapshot)
            answered += 1
    return snapshot, answered


def window(now: Snapshot, before: Snapshot, version: str, side: str) -> Figures:
    return now.get((version, side), Figures()).minus(before.get((version, side), Figures()))


@dataclass(frozen=True)
class Verdict:
    action: str  # step | rollback | wait
    reasons: tuple[str, ...]
    figures: dict[str, Any]


def judge(stable: Figures, candidate: Figures, shadow: Figures, analysis: Analysis, canary: bool) -> Verdict:
    """Hold the candidate's window against the stable's and the thresholds. `canary`: the candidate
    answers real requests in this phase (else it only sees shadows)."""
    figures = {"stable": stable.describe(), "candidate": candidate.describe(), "shadow": shadow.describe()}
    seen = candidate.requests if canary else shadow.shadow_calls
    if seen < analysis.min_requests:
        return Verdict(WAIT, (f"{int(seen)} candidate calls in the window, need {analysis.min_requests}",), figures)
    bad: list[str] = []
    rate = candidate.error_rate if canary else shadow.shadow_error_rate
    stable_rate = stable.error_rate or 0.0
    if rate is not None:
        limit = max(analysis.max_error_rate, stable_rate + analysis.max_error_rate_increase)
        if rate > limit:
            bad.append(f"error rate {rate:.3f} > {limit:.3f}")
    cand_p99, stable_p99 = candidate.p99(), stable.p99()
    if canary and cand_p99 is not None and stable_p99 is not None and cand_p99 > stable_p99 * analysis.max_p99_ratio:
        bad.append(f"p99 {cand_p99:.3f}s > {analysis.max_p99_ratio:g} × stable {stable_p99:.3f}s")
    if shadow.agreement is not None and shadow.agreement < analysis.min_agreement:
        bad.append(f"shadow agreement {shadow.agreement:.3f} < {analysis.min_agreement:g}")
    if bad:
        return Verdict(ROLLBACK, tuple(bad), figures)
    return Verdict(STEP, ("candidate as good as stable within the thresholds",), figures)
