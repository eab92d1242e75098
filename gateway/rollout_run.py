"""An automated rollout (like Argo Rollouts' or Flagger's analysis loop): shadow, then canary steps,
each interval judged from the gateways' per-version metrics; stepped up, promoted, or rolled back
on its own. Its state and every decision live in KV (`meshserve/rollout-state/<service>`), so an
interrupted run resumes where it stood."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

from prometheus_client import Counter

from meshserve import telemetry
from meshserve.errors import FailedPrecondition, InvalidInput
from meshserve.gateway.rollout_analysis import ROLLBACK, STEP, Snapshot, gateway_metrics_urls, judge, scrape, window
from meshserve.gateway.rollout_policy import Analysis, Candidate, RolloutPolicy, parse_rollout, rollout_key
from meshserve.gateway.rollout_store import read_rollout, write_rollout
from meshserve.registry.client import RegistryClient
from meshserve.registry.config import SERVICE_NAMES, RegistryConfig
from meshserve.rpc.https import client_context
from meshserve.rpc.tls_files import TlsFiles

log = logging.getLogger(__name__)
_TRACER = telemetry.tracer("meshserve.rollout")

STATE_PREFIX = "meshserve/rollout-state/"
RUNNING, PROMOTED, ROLLED_BACK, ABORTED = "running", "promoted", "rolled-back", "aborted"
MAX_EVENTS = 100
DECISIONS = Counter("meshserve_rollout_decisions_total", "Rollout analysis decisions", ["service", "decision"])


@dataclass(frozen=True)
class RolloutRun:
    service: str
    version: str  # the candidate
    stable: str
    steps: tuple[float, ...]  # canary percents; the last one ≥ 100 promotes
    shadow_percent: float
    interval_s: float
    analysis: Analysis
    step: int = -1  # -1: the shadow phase; i: canary at steps[i]
    status: str = RUNNING
    events: tuple[dict[str, Any], ...] = ()

    @property
    def canary_percent(self) -> float:
        return 0.0 if self.step < 0 else self.steps[self.step]

    def policy(self) -> RolloutPolicy:
        """The traffic policy this run stands at."""
        if self.status == PROMOTED:
            return RolloutPolicy(self.service, self.version, None, self.analysis)
        if self.status != RUNNING:
            return RolloutPolicy(self.service, self.stable, None, self.analysis)
        candidate = Candidate(self.version, canary_percent=self.canary_percent, shadow_percent=self.shadow_percent)
        return RolloutPolicy(self.service, self.stable, candidate, self.analysis)

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "steps": list(self.steps), "events": list(self.events)})

    @classmethod
    def from_json(cls, text: str) -> RolloutRun:
        data = json.loads(text)
        return cls(**{**data, "steps": tuple(data["steps"]), "analysis": Analysis(**data["analysis"]),
                      "events": tuple(data["events"])})  # fmt: skip


def state_key(service: str) -> str:
    rollout_key(service)  # the same services as the policies
    return STATE_PREFIX + service


async def load_run(client: RegistryClient, service: str) -> RolloutRun | None:
    text = await client.kv_get(state_key(service))
    return RolloutRun.from_json(text) if text else None


async def save_run(client: RegistryClient, run: RolloutRun) -> None:
    await client.kv_put(state_key(run.service), run.to_json())


async def apply(client: RegistryClient, run: RolloutRun) -> None:
    """Write the run's state, then the traffic policy it stands at (checked first: thresholds from
    the command line are validated like a document's)."""
    policy = run.policy()
    parse_rollout(run.service, json.dumps(policy.to_document()))
    await save_run(client, run)
    await write_rollout(client, policy)


def record(run: RolloutRun, decision: str, reasons: tuple[str, ...] = (), figures: dict[str, Any] | None = None,
           ) -> RolloutRun:  # fmt: skip
    """A decision as an event: a log line, a span, a metric, and (once saved) in KV."""
    event = {"at": time.time(), "decision": decision, "step": run.step, "canary_percent": run.canary_percent,
             "shadow_percent": run.shadow_percent, "reasons": list(reasons), "figures": figures or {}}
    with _TRACER.start_as_current_span("rollout decision", attributes={
            "service": run.service, "version": run.version, "decision": decision,
            "reasons": "; ".join(reasons), "figures": json.dumps(figures or {})}):  # fmt: skip
        log.info("rollout %s → %s: %s (%s) %s", run.service, run.version, decision, "; ".join(reasons),
                 json.dumps(figures or {}))  # fmt: skip
    DECISIONS.labels(run.service, decision).inc()
    return replace(run, events=(*run.events, event)[-MAX_EVENTS:])


async def current_stable(client: RegistryClient, service: str, candidate: str) -> str:
    """The stable version when no policy names one: the newest passing version other than the candidate."""
    stored = await read_rollout(client, service)
    if stored.policy is not None:
        return stored.policy.stable
    role = service if service in ("detector", "embedder", "shipping") else "classifier"
    instances = await client.passing(SERVICE_NAMES[role])
    versions = sorted({i.meta.get("version", "") for i in instances
                       if role != "classifier" or i.meta.get("model") == service} - {candidate, ""})  # fmt: skip
    if not versions:
        raise FailedPrecondition(f"{service}: no passing version besides {candidate} to keep as stable; "
                                 "give --stable")  # fmt: skip
    return versions[-1]


@dataclass(frozen=True)
class StartOptions:
    service: str
    version: str
    steps: tuple[float, ...] = (5.0, 25.0, 50.0, 100.0)
    shadow_percent: float = 0.0
    interval_s: float = 60.0
    # Thresholds given on the command line; the rest come from the policy's `analysis`, else defaults.
    thresholds: tuple[tuple[str, float], ...] = ()
    stable: str | None = None
    metrics_urls: tuple[str, ...] = ()  # default: every registered gateway's metrics_port
    tls: TlsFiles | None = None  # our client certificate for gateways serving /metrics over mTLS

    def __post_init__(self) -> None:
        if not self.steps or any(not 0 < s <= 100 for s in self.steps) or list(self.steps) != sorted(self.steps):
            raise InvalidInput("--steps: need rising percents in (0, 100], e.g. 5,25,50,100")
        if not 0 <= self.shadow_percent <= 100:
            raise InvalidInput("--shadow: need a percent in [0, 100]")
        if not 0.1 <= self.interval_s <= 86_400:
            raise InvalidInput("--interval: need 100ms … 24h")


async def begin(client: RegistryClient, options: StartOptions) -> RolloutRun:
    """A new run (or the one already running for this version, resumed)."""
    run = await load_run(client, options.service)
    if run is not None and run.status == RUNNING:
        if run.version != options.version:
            raise FailedPrecondition(f"{options.service}: a rollout of version {run.version} is running; "
                                     "`rollout abort` it first")  # fmt: skip
        run = record(run, "resumed")
        await apply(client, run)
        return run
    stable = options.stable or await current_stable(client, options.service, options.version)
    if stable == options.version:
        raise FailedPrecondition(f"{options.service}: version {options.version} is already stable")
    stored = (await read_rollout(client, options.service)).policy
    analysis = replace(stored.analysis if stored else Analysis(), **dict(options.thresholds))
    run = RolloutRun(options.service, options.version, stable, options.steps, options.shadow_percent,
                     options.interval_s, analysis, step=-1 if options.shadow_percent else 0)  # fmt: skip
    run = record(run, "started")
    await apply(client, run)
    return run


def advance(run: RolloutRun, action: str) -> RolloutRun:
    if action == ROLLBACK:
        return replace(run, status=ROLLED_BACK)
    if action == STEP:
        nxt = run.step + 1
        if nxt >= len(run.steps) or run.steps[nxt] >= 100:
            return replace(run, step=len(run.steps) - 1, status=PROMOTED)
        return replace(run, step=nxt)
    return run


async def run_rollout(registry: RegistryConfig, options: StartOptions) -> RolloutRun:
    """Drive one rollout to its end (promoted, rolled back, or aborted from outside)."""
    async with RegistryClient(registry) as client:
        run = await begin(client, options)
        tls = client_context(options.tls) if options.tls is not None else None
        urls = list(options.metrics_urls) or await gateway_metrics_urls(registry)
        before, _ = await scrape(urls, run.service, tls=tls)
        while True:
            await asyncio.sleep(run.interval_s)
            stored = await load_run(client, run.service)
            if stored is None or stored.status != RUNNING:
                log.info("rollout %s: %s from outside; stopping", run.service, stored.status if stored else "deleted")
                return stored or run
            run = replace(stored, interval_s=run.interval_s)
            urls = list(options.metrics_urls) or await gateway_metrics_urls(registry)
            now, answered = await scrape(urls, run.service, tls=tls)
            verdict = judge(window(now, before, run.stable, "stable"), window(now, before, run.version, "candidate"),
                            window(now, before, run.version, "shadow"), run.analysis, canary=run.step >= 0)
            before = now
            figures = {**verdict.figures, "gateways": answered}
            run = record(advance(run, verdict.action), verdict.action, verdict.reasons, figures)
            await apply(client, run)
            if run.status != RUNNING:
                return run


async def finish(registry: RegistryConfig, service: str, status: str) -> RolloutRun:
    """`rollout promote` / `rollout abort`: end the run by hand and set the policy accordingly."""
    async with RegistryClient(registry) as client:
        run = await load_run(client, service)
        if run is None:
            stored = await read_rollout(client, service)
            policy = stored.policy
            if policy is None or policy.candidate is None:
                raise FailedPrecondition(f"{service}: no rollout and no candidate in {rollout_key(service)}")
            run = RolloutRun(service, policy.candidate.version, policy.stable, (100.0,), 0.0, 60.0, policy.analysis)
        run = record(replace(run, status=status), "promoted by hand" if status == PROMOTED else "aborted by hand")
        await apply(client, run)
        return run


__all__ = ["RolloutRun", "StartOptions", "Snapshot", "run_rollout", "finish", "load_run"]
