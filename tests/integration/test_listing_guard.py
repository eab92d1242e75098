"""ListingGuard/Check end to end over real processes: the dev registry, the three classifiers, the
shipping estimator, the detector and the gateway; the policy changed live in KV."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from tests.integration.guard_mesh import (
    CLASSIFIERS,
    GuardMesh,
    decision_name,
    listing,
    status_name,
    verdicts,
)
from tests.support import DevAgent, Spawner, free_port, meshserve_argv, wait_serving, wait_until

# Thresholds no score reaches (1.0 is the top of a probability): every classifier says allow.
NEVER = {"review_threshold": 1.0, "block_threshold": 1.0}


@pytest.fixture(scope="module")
def mesh(tiny_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GuardMesh]:
    spawner = Spawner(tmp_path_factory.mktemp("guard-mesh"))
    try:
        agent = DevAgent(spawner).start()
        mesh = GuardMesh(spawner, tiny_home, agent)
        mesh.start_models()
        mesh.start_gateway()
        wait_until(lambda: mesh.guard_health() == health_pb2.HealthCheckResponse.SERVING, timeout=30,
                   what="ListingGuard SERVING")
        yield mesh
    finally:
        spawner.stop_all()


@pytest.fixture
def clean_policy(mesh: GuardMesh) -> Iterator[None]:
    """Each test starts from the built-in policy and leaves it so."""
    mesh.delete_policy()
    wait_until(lambda: mesh.check(listing()).policy_version == "default", timeout=10, what="default policy")
    yield
    mesh.delete_policy()


@pytest.fixture(scope="module")
def photo(tiny_home: Path) -> bytes:
    from meshserve.training.catalogue import load_items
    from meshserve.training.render import render_photo

    item = next(i for i in load_items(tiny_home) if i.category == "mug")
    return render_photo(item, 4_000_000_001).jpeg


def test_every_model_answers_in_parallel(mesh: GuardMesh, clean_policy: None, photo: bytes) -> None:
    response = mesh.check(listing(photos=(photo,)))
    found = verdicts(response)
    assert set(found) == {*CLASSIFIERS, "shipping", "detector"}
    for model, verdict in found.items():
        assert status_name(verdict) == "OK", (model, verdict.detail)
        assert verdict.version and response.versions[model] == verdict.version
    assert 0.0 <= found["counterfeit"].score <= 1.0
    assert found["shipping"].label in ("small", "medium", "large", "oversize")
    assert response.suggestions and response.suggestions[0].category == found["detector"].label
    assert len(response.suggestions) <= 3
    assert not response.partial
    assert response.policy_version == "default"
    assert len(response.trace_id) == 32
    # One trace: the Check's server span and one span per model, each naming the policy version.
    def model_spans() -> list[dict]:
        found = [s for s in mesh.spans(response.trace_id) if s["name"].startswith("guard ")]
        return found if len(found) >= 5 else []

    spans = wait_until(model_spans, timeout=10, what="the Check's spans")
    assert {s["attributes"].get("model") for s in spans} == {*CLASSIFIERS, "shipping", "detector"}
    assert all(s["attributes"].get("policy_version") == "default" for s in spans)
    assert decision_name(response) in ("ALLOW", "REVIEW", "BLOCK")
    # Without a photo the detector is not asked; without sizes the estimator says why it was not.
    bare = verdicts(mesh.check(listing(attributes={})))
    assert "detector" not in bare
    assert status_name(bare["shipping"]) == "DISABLED" and "width_cm" in bare["shipping"].detail


def test_decision_follows_thresholds_and_policy_changes_live(mesh: GuardMesh, clean_policy: None) -> None:
    request = listing(title="mug listing for the threshold test")
    allow_version = mesh.put_policy({"models": {m: NEVER for m in CLASSIFIERS}})
    allowed = mesh.wait_policy(str(allow_version), request)
    assert decision_name(allowed) == "ALLOW" and not allowed.flagged

    # Block at 0 for one model: the next answers block, within a second or so of the write.
    written = time.monotonic()
    block_version = mesh.put_policy({"models": {**{m: NEVER for m in CLASSIFIERS},
                                                "counterfeit": {"review_threshold": 0.0, "block_threshold": 0.0}}})
    blocked = mesh.wait_policy(str(block_version), request)
    in_force_s = time.monotonic() - written
    print(f"policy write → in force in the next answer: {in_force_s * 1000:.0f} ms")
    assert in_force_s < 3.0, f"policy took {in_force_s:.2f}s to apply"  # goal 1 s; generous on a loaded box
    assert decision_name(blocked) == "BLOCK" and blocked.flagged
    assert any(r.startswith("counterfeit") for r in blocked.reasons)
    assert not verdicts(blocked)["counterfeit"].cached  # a new policy version never reuses a verdict

    # Disable that model: its verdict says so and the decision no longer counts it.
    off_version = mesh.put_policy({"models": {**{m: NEVER for m in CLASSIFIERS},
                                              "counterfeit": {"enabled": False, "review_threshold": 0.0,
                                                              "block_threshold": 0.0}}})  # fmt: skip
    disabled = mesh.wait_policy(str(off_version), request)
    assert status_name(verdicts(disabled)["counterfeit"]) == "DISABLED"
    assert decision_name(disabled) == "ALLOW" and not disabled.partial


def test_invalid_document_changes_nothing_and_shows_in_status(mesh: GuardMesh, clean_policy: None) -> None:
    request = listing(title="mug listing for the invalid-document test")
    good = mesh.put_policy({"models": {"counterfeit": {"review_threshold": 0.2, "block_threshold": 0.95}}})
    mesh.wait_policy(str(good), request)
    for bad in ({"models": {"counterfeit": {"review_threshold": 0.9, "block_threshold": 0.5}}},
                {"models": {"counterfeit": {"block_threshold": 1.5}}},
                {"models": {"fraud": {"enabled": True}}},
                {"models": {"counterfeit": {"enabled": "yes"}}},
                "{not json"):  # fmt: skip
        bad_version = mesh.put_policy(bad)
        wait_until(lambda: 'meshserve_gateway_policy_valid{flow="listing-guard"} 0.0' in mesh.metrics(),
                   timeout=10, what="the gateway refused the document")
        answer = mesh.check(request)
        assert answer.policy_version == str(good), bad
        assert verdicts(answer)["counterfeit"].review_threshold == pytest.approx(0.2)
        status = subprocess.run(meshserve_argv("status", "--json", "--consul", mesh.agent.http_addr),
                                capture_output=True, text=True, timeout=60)  # fmt: skip
        assert status.returncode == 0, status.stderr
        flow = json.loads(status.stdout)["flows"]["listing-guard"]
        assert flow["version"] == str(bad_version) and flow["valid"] is False and flow["error"], flow
    assert mesh.models["gateway"].alive()
    # A valid document again: in force, and the metric says so.
    fixed = mesh.put_policy({"models": {"counterfeit": {"review_threshold": 0.3}}})
    mesh.wait_policy(str(fixed), request)
    assert 'meshserve_gateway_policy_valid{flow="listing-guard"} 1.0' in mesh.metrics()


def test_slow_classifier_times_out_and_the_others_answer(mesh: GuardMesh, clean_policy: None,
                                                         tmp_path: Path) -> None:  # fmt: skip
    # A newer version of `prohibited` that takes 300 ms; the gateway routes to the newest version.
    slow_dir = mesh.classifier_copy("prohibited", "slow", tmp_path)
    slow, _ = mesh.serve("classifier", "--model", str(slow_dir), "--inject-delay-ms", "300", name="slow")
    try:
        version = mesh.put_policy({"models": {"prohibited": {"timeout_ms": 100}}})
        request = listing(title="mug listing for the timeout test")

        def slow_routed() -> bool:
            answer = mesh.check(request)
            return answer.policy_version == str(version) and verdicts(answer)["prohibited"].version.endswith("-slow")

        wait_until(lambda: status_name(verdicts(mesh.check(request))["prohibited"]) == "TIMEOUT" or slow_routed(),
                   timeout=20, what="the slow replica in the route")  # fmt: skip
        timings = []
        for n in range(5):
            started = time.perf_counter()
            answer = mesh.check(listing(title=f"mug listing for the timeout test {n}"))
            timings.append(time.perf_counter() - started)
            found = verdicts(answer)
            assert status_name(found["prohibited"]) == "TIMEOUT", found["prohibited"]
            assert answer.partial
            assert all(status_name(found[m]) == "OK" for m in ("counterfeit", "contact_info", "shipping"))
        print("Check with one classifier at 300 ms, timeout 100 ms: " + ", ".join(f"{t * 1000:.0f}" for t in timings)
              + " ms")  # fmt: skip
        # 100 ms timeout, well under the slow model's 300 ms (generous for a loaded 2-core machine).
        assert sorted(timings)[len(timings) // 2] < 0.2, timings
    finally:
        slow.stop()


def test_caller_deadline_shorter_than_every_timeout(mesh: GuardMesh, clean_policy: None, tmp_path: Path) -> None:
    slow_dir = mesh.classifier_copy("contact_info", "slow", tmp_path)
    slow, _ = mesh.serve("classifier", "--model", str(slow_dir), "--inject-delay-ms", "400", name="slow")
    try:
        version = mesh.put_policy({"models": {m: {"timeout_ms": 2000} for m in CLASSIFIERS}})
        request = listing(title="mug listing for the deadline test")
        wait_until(lambda: verdicts(mesh.check(request))["contact_info"].version.endswith("-slow"),
                   timeout=20, what="the slow replica in the route")  # fmt: skip
        started = time.perf_counter()
        error = mesh.refused(listing(title="mug listing for the deadline test 2"), timeout=0.2)
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.perf_counter() - started < 1.5
        # The gateway itself said so (a few ms before the caller would have given up), not only the client.
        wait_until(lambda: 'meshserve_gateway_requests_total{code="DEADLINE_EXCEEDED",method="Check"}'
                   in mesh.metrics(), timeout=10, what="the gateway's DEADLINE_EXCEEDED")  # fmt: skip
        assert mesh.check(request).policy_version == str(version)  # still serving
    finally:
        slow.stop()


def test_killed_classifier_is_unavailable_and_the_rule_decides(mesh: GuardMesh, clean_policy: None) -> None:
    request = listing(title="mug listing for the kill test")
    open_version = mesh.put_policy({"models": {m: NEVER for m in CLASSIFIERS}})
    mesh.wait_policy(str(open_version), request)
    mesh.models["contact_info"].kill()
    try:
        def unavailable() -> object:
            answer = mesh.check(request)
            return answer if status_name(verdicts(answer)["contact_info"]) == "UNAVAILABLE" else None

        answer = wait_until(unavailable, timeout=10, what="contact_info UNAVAILABLE")
        assert answer.partial and decision_name(answer) == "ALLOW"  # fail-open: the others decide
        assert all(status_name(verdicts(answer)[m]) == "OK" for m in ("counterfeit", "prohibited"))

        closed_version = mesh.put_policy({"models": {**{m: NEVER for m in CLASSIFIERS},
                                                     "contact_info": {**NEVER, "missing": "fail-closed"}}})
        closed = mesh.wait_policy(str(closed_version), request)
        assert status_name(verdicts(closed)["contact_info"]) == "UNAVAILABLE"
        assert decision_name(closed) == "REVIEW" and any("fail-closed" in r for r in closed.reasons)
    finally:
        mesh.models["contact_info"], _ = mesh.serve("classifier", "--model", "contact_info", name="contact_info")


def test_verdict_cache_never_serves_another_model_or_policy_version(mesh: GuardMesh, clean_policy: None,
                                                                    tmp_path: Path) -> None:  # fmt: skip
    request = listing(title="mug listing for the cache test")
    first = verdicts(mesh.check(request))["counterfeit"]
    again = verdicts(mesh.check(request))["counterfeit"]
    assert not first.cached and again.cached and again.version == first.version

    # A new version of counterfeit passes: the gateway moves to it, and its first verdict is fresh.
    new_dir = mesh.classifier_copy("counterfeit", "v2", tmp_path)
    new, _ = mesh.serve("classifier", "--model", str(new_dir), name="counterfeit-v2")
    old = mesh.models["counterfeit"]
    try:
        seen = wait_until(lambda: (v := verdicts(mesh.check(request))["counterfeit"]).version != first.version and v,
                          timeout=20, what="the new version in the route")  # fmt: skip
        assert seen.version == f"{first.version}-v2" and not seen.cached
        old.stop()
        for _ in range(3):
            v = verdicts(mesh.check(request))["counterfeit"]
            assert v.version == seen.version and v.cached
        # A new policy version: the same listing and model version, but no old verdict.
        version = mesh.put_policy({"models": {"counterfeit": {"review_threshold": 0.4}}})
        fresh = verdicts(mesh.wait_policy(str(version), request))["counterfeit"]
        assert not fresh.cached and fresh.version == seen.version
    finally:
        new.stop()
        if not old.alive():
            mesh.models["counterfeit"], _ = mesh.serve("classifier", "--model", "counterfeit", name="counterfeit")
    assert 'meshserve_gateway_cache_lookups_total{cache="verdicts",result="hit"}' in mesh.metrics()


@pytest.mark.parametrize("mode", ["nan", "shape"])
def test_garbage_from_a_model_is_an_error_verdict_not_a_failed_check(mesh: GuardMesh, clean_policy: None,
                                                                     mode: str) -> None:  # fmt: skip
    # A newer "prohibited" whose model answers garbage; the gateway routes to the newest version.
    port, version = free_port(), "99991231T000000-000"  # sorts after any trained version
    garbage = mesh.spawn([sys.executable, "-m", "tests.integration.garbage_classifier", mode, "prohibited",
                          version, str(port), mesh.agent.http_addr], name=f"garbage-{mode}")  # fmt: skip
    try:
        wait_serving(f"127.0.0.1:{port}", garbage, timeout=60)
        request = listing(title=f"mug listing for the garbage test {mode}")
        answer = wait_until(lambda: (a := mesh.check(request)) and verdicts(a)["prohibited"].version == version
                            and a, timeout=20, what="the garbage replica in the route")  # fmt: skip
        bad = verdicts(answer)["prohibited"]
        assert status_name(bad) == "ERROR" and "score" in bad.detail, bad
        assert answer.partial
        assert all(status_name(verdicts(answer)[m]) == "OK" for m in ("counterfeit", "contact_info"))
    finally:
        garbage.stop()


@pytest.mark.parametrize("change, field", [
    ({"title": "", "description": ""}, "listing: empty"),
    ({"title": "x" * (16 * 1024 + 1)}, "listing.title"),
    ({"description": "y" * (16 * 1024 + 1)}, "listing.description"),
    ({"price_cents": -5}, "listing.price_cents"),
    ({"photos": (b"\x89PNG\r\n\x1a\n" + b"0" * 64,) * 9}, "listing.images"),
    ({"photos": (b"GIF89a not an image we take",)}, "listing.images[0]"),
    ({"attributes": {"width_cm": "nan", "height_cm": "1", "depth_cm": "1", "weight_kg": "1"}},
     "listing.attributes['width_cm']"),
    ({"models": ("fraud",)}, "models"),
])  # fmt: skip
def test_bad_input_is_invalid_argument_naming_the_field(mesh: GuardMesh, change: dict, field: str) -> None:
    error = mesh.refused(listing(**change))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert field in (error.details() or ""), error.details()


def test_health_follows_whether_the_flow_can_serve(mesh: GuardMesh, clean_policy: None) -> None:
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    assert mesh.guard_health() == serving
    mesh.put_policy({"models": {m: {"enabled": False} for m in CLASSIFIERS}})
    wait_until(lambda: mesh.guard_health() == not_serving, timeout=10, what="ListingGuard NOT_SERVING")
    mesh.delete_policy()
    wait_until(lambda: mesh.guard_health() == serving, timeout=10, what="ListingGuard SERVING again")


def test_guard_and_config_commands(mesh: GuardMesh, clean_policy: None, tmp_path: Path) -> None:
    env = {"CONSUL_HTTP_ADDR": mesh.agent.http_addr, "MESHSERVE_GATEWAY": mesh.gateway_target}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        import os

        return subprocess.run([sys.executable, "-m", "meshserve.cli", *args], capture_output=True, text=True,
                              timeout=60, env={**os.environ, **env})  # fmt: skip

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"models": {"counterfeit": {"review_threshold": 2}}}))
    refused = run("config", "validate", "listing-guard", str(bad))
    assert refused.returncode != 0 and "models.counterfeit.review_threshold" in refused.stderr
    assert run("config", "set", "listing-guard", str(bad)).returncode != 0
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"models": {"counterfeit": {"review_threshold": 0.0, "block_threshold": 0.0}}}))
    assert run("config", "validate", "listing-guard", str(good)).returncode == 0
    written = run("config", "set", "listing-guard", str(good))
    assert written.returncode == 0, written.stderr
    got = run("config", "get", "listing-guard", "--json")
    assert got.returncode == 0, got.stderr
    shown = json.loads(got.stdout)
    assert shown["document"]["models"]["counterfeit"]["block_threshold"] == 0.0
    # check-and-set: a write based on an older version is refused.
    stale = run("config", "set", "listing-guard", str(good), "--cas", str(int(shown["modify_index"]) - 1))
    assert stale.returncode != 0 and "changed" in stale.stderr

    checked = wait_until(lambda: (r := run("guard", "check", "--title", "a mug", "--description", "blue",
                                           "--price", "12.50", "--category", "mug", "--json")).returncode == 0
                         and json.loads(r.stdout)["policy_version"] == str(shown["modify_index"])
                         and json.loads(r.stdout), timeout=10, what="guard check under the new policy")
    assert checked["decision"] == "block"
    assert {v["model"] for v in checked["verdicts"]} >= set(CLASSIFIERS)
    nan = run("guard", "check", "--title", "a mug", "--price", "nan")
    assert nan.returncode != 0 and "price" in nan.stderr

