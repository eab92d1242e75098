"""The flows' policy documents (validation, defaults), the guard's decision rule and its verdict cache."""

from __future__ import annotations

import json

import pytest

from meshserve.gateway.flow_policy import (
    CLASSIFIERS,
    GuardPolicy,
    PolicyError,
    parse_guard_policy,
    parse_photo_defaults,
    validate,
)
from meshserve.gateway.guard_decision import Decision, Status, Verdict, decide
from meshserve.gateway.verdict_cache import VerdictCache, VerdictKey


def test_guard_knows_the_violations_the_classifiers_are_trained_on() -> None:
    from meshserve.inference.vocabulary import VIOLATIONS

    assert CLASSIFIERS == VIOLATIONS


def test_a_partial_document_keeps_the_defaults_for_the_rest() -> None:
    policy = parse_guard_policy(json.dumps({"models": {"counterfeit": {"block_threshold": 0.7}}, "top_k": 5}), "42")
    assert policy.version == "42" and policy.top_k == 5
    assert policy.model("counterfeit").block_threshold == 0.7
    assert policy.model("counterfeit").review_threshold == GuardPolicy().model("counterfeit").review_threshold
    assert policy.model("prohibited") == GuardPolicy().model("prohibited")
    assert parse_guard_policy("{}").models == GuardPolicy().models


@pytest.mark.parametrize("doc, names", [
    ({"models": {"counterfeit": {"review_threshold": 0.9, "block_threshold": 0.5}}}, "review_threshold 0.9 is above"),
    ({"models": {"counterfeit": {"review_threshold": 0.95}}}, "above block_threshold 0.9"),
    ({"models": {"counterfeit": {"block_threshold": 1.5}}}, "models.counterfeit.block_threshold"),
    ({"models": {"counterfeit": {"review_threshold": -0.1}}}, "models.counterfeit.review_threshold"),
    ({"models": {"counterfeit": {"review_threshold": "0.5"}}}, "must be a number"),
    ({"models": {"counterfeit": {"review_threshold": True}}}, "must be a number"),
    ({"models": {"counterfeit": {"enabled": "yes"}}}, "models.counterfeit.enabled"),
    ({"models": {"counterfeit": {"timeout_ms": 0}}}, "models.counterfeit.timeout_ms"),
    ({"models": {"counterfeit": {"missing": "fail-shut"}}}, "models.counterfeit.missing"),
    ({"models": {"counterfeit": {"treshold": 0.5}}}, "unknown key 'treshold'"),
    ({"models": {"fraud": {}}}, "unknown model 'fraud'"),
    ({"models": []}, "models: must be a JSON object"),
    ({"top_k": 0}, "top_k"),
    ({"top_k": 2.5}, "top_k: must be an integer"),
    ({"thresholds": {}}, "unknown key 'thresholds'"),
    ([], "must be a JSON object"),
])  # fmt: skip
def test_an_invalid_guard_document_is_refused_naming_the_field(doc: object, names: str) -> None:
    with pytest.raises(PolicyError, match=names.replace("(", r"\(").replace(".", r"\.")):
        parse_guard_policy(json.dumps(doc))


def test_not_json_and_unknown_flows() -> None:
    with pytest.raises(PolicyError, match="not valid JSON"):
        validate("listing-guard", "{nope")
    with pytest.raises(Exception, match="unknown flow 'search'"):
        validate("search", "{}")


def test_photo_search_defaults() -> None:
    defaults = parse_photo_defaults('{"top_k": 5, "min_detection_score": 0.5}', "7")
    assert (defaults.top_k, defaults.min_detection_score, defaults.version) == (5, 0.5, "7")
    for bad in ('{"top_k": 0}', '{"top_k": 101}', '{"min_detection_score": 0}', '{"min_detection_score": 2}',
                '{"k": 3}'):
        with pytest.raises(PolicyError):
            parse_photo_defaults(bad)


def _verdict(model: str, score: float, status: Status = Status.OK) -> Verdict:
    return Verdict(model, status, "v1", score, review_threshold=0.5, block_threshold=0.9)


def test_the_strictest_classifier_decides() -> None:
    policy = GuardPolicy()
    assert decide([_verdict("counterfeit", 0.1), _verdict("prohibited", 0.2)], policy)[0] is Decision.ALLOW
    decision, reasons = decide([_verdict("counterfeit", 0.6), _verdict("prohibited", 0.2)], policy)
    assert decision is Decision.REVIEW and reasons == ["counterfeit 0.600 ≥ review 0.5"]
    decision, reasons = decide([_verdict("counterfeit", 0.6), _verdict("prohibited", 0.95)], policy)
    assert decision is Decision.BLOCK and len(reasons) == 2
    # Shipping and the detector never decide, whatever their score.
    assert decide([_verdict("shipping", 1.0), _verdict("detector", 1.0)], policy)[0] is Decision.ALLOW


def test_a_missing_verdict_counts_only_when_fail_closed() -> None:
    missing = [_verdict("counterfeit", 0.0, Status.TIMEOUT), _verdict("prohibited", 0.1)]
    assert decide(missing, GuardPolicy())[0] is Decision.ALLOW
    closed = parse_guard_policy('{"models": {"counterfeit": {"missing": "fail-closed"}}}')
    decision, reasons = decide(missing, closed)
    assert decision is Decision.REVIEW and reasons == ["counterfeit TIMEOUT (fail-closed)"]
    for status in (Status.UNAVAILABLE, Status.ERROR):
        assert decide([_verdict("counterfeit", 0.0, status)], closed)[0] is Decision.REVIEW
    # Disabled is not missing: the operator turned it off.
    assert decide([_verdict("counterfeit", 0.0, Status.DISABLED)], closed)[0] is Decision.ALLOW


def test_verdict_cache_keys_on_model_and_policy_version_and_stays_bounded() -> None:
    cache = VerdictCache(max_entries=3, max_bytes=1_000_000)
    key = VerdictKey("hash", "counterfeit", "v1", "10")
    cache.put(key, _verdict("counterfeit", 0.3))
    assert cache.get(key) is not None
    assert cache.get(VerdictKey("hash", "counterfeit", "v2", "10")) is None
    assert cache.get(VerdictKey("hash", "counterfeit", "v1", "11")) is None
    for n in range(10):
        cache.put(VerdictKey(f"h{n}", "counterfeit", "v1", "10"), _verdict("counterfeit", 0.3))
    assert len(cache) == 3 and cache.get(key) is None  # least recently used went first

    small = VerdictCache(max_entries=1000, max_bytes=4000)
    for n in range(100):
        small.put(VerdictKey(f"h{n}", "counterfeit", "v1", "10"), _verdict("counterfeit", 0.3))
    assert 0 < small.bytes <= 4000 and len(small) < 100


def _docs(**docs: tuple[str, int]) -> object:
    from types import MappingProxyType

    from meshserve.registry.watch import KVSnapshot

    value = MappingProxyType({f"meshserve/config/{flow.replace('_', '-')}": doc for flow, doc in docs.items()})
    return KVSnapshot(target="meshserve/config/", value=value, version=1, index=1, ready=True, stale=False,
                      stale_since=None, last_contact=None)  # fmt: skip


def test_flow_configs_apply_valid_documents_and_keep_the_last_valid_one() -> None:
    from prometheus_client import REGISTRY

    from meshserve.gateway.flow_config import FlowConfigs
    from meshserve.registry.config import RegistryConfig

    applied: list[object] = []
    configs = FlowConfigs(RegistryConfig(), on_apply={"listing-guard": applied.append})

    def refused_total() -> float:
        return REGISTRY.get_sample_value("meshserve_gateway_policy_rejected_total", {"flow": "listing-guard"}) or 0.0

    configs._changed(_docs(listing_guard=('{"top_k": 5}', 7)))  # type: ignore[arg-type]
    assert configs.state("listing-guard").version == "7" and configs.policy("listing-guard").top_k == 5
    assert len(applied) == 1

    before = refused_total()
    for _ in range(3):  # the same refused version again and again: refused (and counted) once
        configs._changed(_docs(listing_guard=('{"top_k": 0}', 8)))  # type: ignore[arg-type]
    state = configs.state("listing-guard")
    assert state.version == "7" and state.policy.top_k == 5
    assert state.refused_version == "8" and "top_k" in (state.refused_reason or "")
    assert refused_total() == before + 1 and len(applied) == 1

    configs._changed(_docs())  # type: ignore[arg-type]
    assert configs.state("listing-guard").version == "default" and configs.policy("listing-guard") == GuardPolicy()


def test_photo_search_defaults_reach_the_gateways_search() -> None:
    from meshserve.gateway.server import Gateway, GatewayConfig
    from meshserve.registry.config import RegistryConfig

    gateway = Gateway(GatewayConfig(registry=RegistryConfig()))
    gateway.guard.configs._changed(_docs(photo_search=('{"top_k": 4, "min_detection_score": 0.6}', 3)))  # type: ignore[arg-type]
    assert (gateway.search.config.default_top_k, gateway.search.config.default_min_score) == (4, 0.6)
