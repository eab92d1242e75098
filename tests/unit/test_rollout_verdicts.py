"""Rollout analysis: figures parsed from the gateway's exposition text, windows, p99 from buckets,
the verdicts; the run's steps; shadow comparisons."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from meshserve.errors import InvalidInput
from meshserve.gateway.model_wire import Detected
from meshserve.gateway.rollout_analysis import ROLLBACK, STEP, WAIT, Figures, judge, parse_metrics, window
from meshserve.gateway.rollout_policy import Analysis
from meshserve.gateway.rollout_run import PROMOTED, ROLLED_BACK, RolloutRun, StartOptions, advance
from meshserve.gateway.shadow import compare_detections, compare_matches, compare_scores


def _exposition(ok: dict[tuple[str, str], int], errors: dict[tuple[str, str], int], slow: float) -> str:
    registry = CollectorRegistry()
    requests = Counter("meshserve_gateway_version_requests_total", "", ["service", "version", "arm", "outcome"],
                       registry=registry)
    latency = Histogram("meshserve_gateway_version_latency_seconds", "", ["service", "version", "arm"],
                        buckets=(0.01, 0.1, 1), registry=registry)
    for (version, arm), n in ok.items():
        requests.labels("detector", version, arm, "ok").inc(n)
        for _ in range(n):
            latency.labels("detector", version, arm).observe(slow if arm == "canary" else 0.005)
    for (version, arm), n in errors.items():
        requests.labels("detector", version, arm, "error").inc(n)
    requests.labels("embedder", "9", "stable", "ok").inc(1000)  # another service: ignored
    return generate_latest(registry).decode()


def test_figures_per_version_and_side_from_the_exposition() -> None:
    text = _exposition({("1", "stable"): 90, ("2", "canary"): 10}, {("2", "canary"): 3}, slow=0.5)
    snap = parse_metrics(text, "detector")
    stable, candidate = window(snap, {}, "1", "stable"), window(snap, {}, "2", "candidate")
    assert (stable.requests, stable.errors) == (90, 0)
    assert (candidate.requests, candidate.errors) == (13, 3)
    assert stable.p99() == 0.01 and candidate.p99() == 1.0


def test_a_window_is_the_difference_of_two_scrapes() -> None:
    before = parse_metrics(_exposition({("2", "canary"): 10}, {("2", "canary"): 10}, 0.005), "detector")
    now = parse_metrics(_exposition({("2", "canary"): 30}, {("2", "canary"): 10}, 0.005), "detector")
    assert window(now, before, "2", "candidate").error_rate == 0.0


def test_verdicts() -> None:
    analysis = Analysis(max_error_rate=0.05, min_requests=10, max_p99_ratio=2)
    fast = {0.01: 100.0, float("inf"): 100.0}
    stable = Figures(requests=100, buckets=fast)
    assert judge(stable, Figures(requests=5), Figures(), analysis, canary=True).action == WAIT
    erroring = judge(stable, Figures(requests=50, errors=10, buckets=fast), Figures(), analysis, canary=True)
    assert erroring.action == ROLLBACK and "error rate 0.200" in erroring.reasons[0]
    slow = Figures(requests=50, buckets={0.01: 0.0, 1.0: 50.0, float("inf"): 50.0})
    assert judge(stable, slow, Figures(), analysis, canary=True).action == ROLLBACK
    assert judge(stable, Figures(requests=50, buckets=fast), Figures(), analysis, canary=True).action == STEP
    disagreeing = Figures(shadow_calls=50, agreement_sum=10, agreement_count=50)
    assert judge(stable, Figures(), disagreeing, Analysis(min_requests=10), canary=False).action == ROLLBACK


def test_a_run_steps_then_promotes_or_rolls_back() -> None:
    run = RolloutRun("detector", "2", "1", (10.0, 50.0, 100.0), 100.0, 2.0, Analysis())
    assert run.policy().candidate.canary_percent == 0 and run.policy().candidate.shadow_percent == 100  # type: ignore[union-attr]
    run = advance(advance(run, STEP), STEP)
    assert run.canary_percent == 50.0
    assert advance(run, STEP).status == PROMOTED and advance(run, STEP).policy().stable == "2"
    back = advance(run, ROLLBACK)
    assert back.status == ROLLED_BACK and back.policy().stable == "1" and back.policy().candidate is None
    assert RolloutRun.from_json(run.to_json()) == run


def test_start_options_are_checked() -> None:
    with pytest.raises(InvalidInput, match="--steps"):
        StartOptions("detector", "2", steps=(50.0, 10.0))


def test_shadow_comparisons() -> None:
    cat = Detected((0, 0, 10, 10), "mug", 0.9)
    assert compare_detections([cat], [cat])["agreement"] == 1.0
    other = compare_detections([cat], [Detected((5, 0, 15, 10), "lamp", 0.8)])
    assert other["agreement"] == 0.0 and 0.3 < other["iou"] < 0.34
    assert compare_matches([["1", "2"]], [["2", "3"]])["top10_overlap"] == 0.5
    assert compare_scores(0.2, 0.5)["agreement"] == pytest.approx(0.7)


def test_a_run_with_a_threshold_out_of_range_is_refused_before_anything_is_written() -> None:
    import asyncio

    from meshserve.gateway.rollout_policy import RolloutPolicyError
    from meshserve.gateway.rollout_run import apply

    class NoWrites:
        async def kv_put(self, key: str, value: str) -> None:
            raise AssertionError("nothing may be written")

    run = RolloutRun("detector", "2", "1", (50.0, 100.0), 0.0, 2.0, Analysis(max_error_rate=2.0), step=0)
    with pytest.raises(RolloutPolicyError, match="analysis.max_error_rate"):
        asyncio.run(apply(NoWrites(), run))  # type: ignore[arg-type]


def test_shadows_beyond_the_bound_are_dropped_and_each_keeps_its_own_budget() -> None:
    import asyncio

    from meshserve.gateway.shadow import SHADOW_CALLS, ShadowConfig, ShadowRunner

    def count(outcome: str) -> float:
        return SHADOW_CALLS.labels("unit", "9", outcome)._value.get()

    async def scenario() -> tuple[list[bool], int]:
        runner = ShadowRunner(ShadowConfig(max_in_flight=3, budget_s=0.2))

        async def slow(deadline: float) -> dict[str, float]:
            await asyncio.sleep(10)
            return {"agreement": 1.0}

        accepted = [runner.submit("unit", "9", slow) for _ in range(5)]
        in_flight = runner.in_flight
        await asyncio.sleep(0.5)  # past the shadows' own budget: they end, nobody waited for them
        assert runner.in_flight == 0
        await runner.close()
        return accepted, in_flight

    before = {o: count(o) for o in ("dropped", "failed")}
    accepted, in_flight = asyncio.run(scenario())
    assert accepted == [True, True, True, False, False] and in_flight == 3
    assert count("dropped") - before["dropped"] == 2 and count("failed") - before["failed"] == 3
