"""Unit tests of the dev agent's decoding: Go durations, Consul's check IDs, meta rules."""

from __future__ import annotations

import pytest

from meshserve.registry.dev.schema import (
    BadRequest,
    format_go_duration,
    parse_go_duration,
    parse_service,
    validate_meta,
)


@pytest.mark.parametrize("text, seconds", [
    ("10s", 10.0), ("1m30s", 90.0), ("250ms", 0.25), ("1.5h", 5400.0), ("0", 0.0),
    ("-2s", -2.0), ("1h2m3.5s", 3723.5), ("100us", 1e-4), ("7ns", 7e-9), (".5s", 0.5),
])
def test_go_durations_parse(text: str, seconds: float) -> None:
    assert parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "10", "s", "1x", "ten seconds", "1s2", "--1s", "1e3s",
                                  "99999999999h"])
def test_bad_go_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="time: "):
        parse_go_duration(text)


@pytest.mark.parametrize("seconds, text", [
    (10, "10s"), (90, "1m30s"), (0.5, "500ms"), (3600, "1h0m0s"), (0, "0s"), (1.5, "1.5s"),
    (60, "1m0s"), (0.000001, "1µs"),
])
def test_go_durations_format(seconds: float, text: str) -> None:
    assert format_go_duration(seconds) == text


def test_check_ids_follow_consul_numbering() -> None:
    _, [one] = parse_service({"Name": "web", "ID": "web-1", "Check": {"TTL": "5s"}})
    assert one.check_id == "service:web-1" and one.name == "Service 'web' check"
    _, checks = parse_service({"Name": "web", "Check": {"TTL": "5s"},
                               "Checks": [{"TTL": "6s"}, {"CheckID": "mine", "TTL": "7s"}]})
    assert [c.check_id for c in checks] == ["service:web:1", "service:web:2", "mine"]
    assert [c.ttl for c in checks] == [5.0, 6.0, 7.0]


def test_nanosecond_durations_and_defaults() -> None:
    service, [check] = parse_service({
        "Name": "web", "Check": {"GRPC": "h:1/svc", "Interval": 2_000_000_000,
                                 "FailuresBeforeCritical": 3}})
    assert service.service_id == "web" and service.weights == {"Passing": 1, "Warning": 1}
    assert check.kind == "grpc" and check.interval == 2.0 and check.target == "h:1/svc"
    assert check.failures_before_warning == 3  # defaults to FailuresBeforeCritical
    assert check.status == ""  # the state starts it critical


def test_meta_rules() -> None:
    validate_meta({"k" * 128: "v" * 512, "model": "x", "a-b_c9": ""})
    for meta in ({"": "v"}, {"k.k": "v"}, {"k" * 129: "v"}, {"consul-x": "v"},
                 {"k": "v" * 513}, {f"k{i}": "" for i in range(65)}):
        with pytest.raises(BadRequest, match="Invalid Service Meta"):
            validate_meta(meta)
