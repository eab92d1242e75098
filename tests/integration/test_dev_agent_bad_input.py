"""Bad input to the dev agent: a 4xx that says what was wrong, and the agent keeps answering."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import consul
import pytest
import requests
from consul.exceptions import BadRequest

from tests.conftest import DevAgent, module_dev_agent
from tests.integration.test_dev_agent import FAST_FLAGS, unique

agent = module_dev_agent(*FAST_FLAGS)


@pytest.fixture
def base(agent: DevAgent) -> Iterator[str]:
    url = f"http://127.0.0.1:{agent.port}"
    yield url
    # whatever the test sent, the agent is still up and answering
    assert agent.proc.alive(), agent.proc.output()
    assert requests.get(url + "/v1/status/leader", timeout=5).json() == "127.0.0.1:8300"


def register(base: str, body: Any) -> requests.Response:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.put(base + "/v1/agent/service/register", data=data, timeout=10)


def assert_4xx(resp: requests.Response, status: int, *words: str) -> None:
    assert resp.status_code == status, (resp.status_code, resp.text)
    for word in words:
        assert word in resp.text, (word, resp.text)


@pytest.mark.parametrize("body, words", [
    (b"{not json", ["Request decode failed"]),
    (b"", ["Request decode failed", "EOF"]),
    (b"[1, 2]", ["Request decode failed", "cannot unmarshal array"]),
    (b'{"Name": "x", "Port": NaN}', ["Request decode failed"]),
    (b"[" * 100_000 + b"]" * 100_000, ["Request decode failed"]),
    ({"Name": "x", "Bogus": 1}, ["Request decode failed", 'json: unknown field "Bogus"']),
    ({"Name": "x", "Check": {"TTL": "5s", "Colour": "red"}}, ['unknown field "Colour"']),
    ({"Name": "x", "Port": "eighty"}, ["Request decode failed", "cannot unmarshal string",
                                        "Port"]),
    ({"Name": "x", "Address": "0.0.0.0"}, ["Invalid service address"]),
    ({"Name": "x", "Weights": {"Passing": 0, "Warning": 1}}, ["Invalid Weights"]),
    ({"Name": "x", "Port": 70000}, ["Port"]),
    ({"Name": "x", "Tags": "a,b"}, ["Tags"]),
    ({"Port": 1}, ["Missing service name"]),
    ({"Name": "n" * 513}, ["Name", "limit"]),
    ({"Name": "x", "Check": {"GRPC": "127.0.0.1:1", "Interval": "ten seconds"}},
     ["Check.Interval", "invalid duration"]),
    ({"Name": "x", "Check": {"GRPC": "127.0.0.1:1", "Interval": True}}, ["Check.Interval"]),
    ({"Name": "x", "Check": {"GRPC": "127.0.0.1:1", "Interval": "10"}}, ["missing unit"]),
    ({"Name": "x", "Check": {"GRPC": "127.0.0.1:1", "Interval": "-1s"}}, ["Interval"]),
    ({"Name": "x", "Check": {"GRPC": "127.0.0.1:1", "Interval": "99999999999h"}},
     ["invalid duration"]),
    ({"Name": "x", "Check": {"GRPC": "127.0.0.1:1"}}, ["Interval must be > 0"]),
    ({"Name": "x", "Check": {"TTL": "1s", "HTTP": "http://x/", "Interval": "1s"}},
     ["only one of"]),
    ({"Name": "x", "Check": {"TTL": "1s", "Status": "fine"}}, ["Status"]),
    ({"Name": "x", "Check": {"Args": ["/bin/true"], "Interval": "1s"}}, ["not supported"]),
    ({"Name": "x", "Check": {"HTTP": "ftp://x", "Interval": "1s"}}, ["http://"]),
    ({"Name": "x", "Check": {"TTL": "1s", "FailuresBeforeWarning": 3,
                             "FailuresBeforeCritical": 1}}, ["FailuresBeforeWarning"]),
    ({"Name": "x", "Meta": {f"k{i}": "v" for i in range(65)}}, ["Invalid Service Meta", "64"]),
    ({"Name": "x", "Meta": {"k" * 129: "v"}}, ["Invalid Service Meta", "too long"]),
    ({"Name": "x", "Meta": {"k": "v" * 513}}, ["Invalid Service Meta", "Value is too long"]),
    ({"Name": "x", "Meta": {"a.b": "v"}}, ["Invalid Service Meta", "invalid characters"]),
    ({"Name": "x", "Meta": {"consul-version": "v"}}, ["Invalid Service Meta", "reserved"]),
    ({"Name": "x", "Meta": {"k": 5}}, ["Request decode failed", "Meta"]),
])
def test_bad_registrations_get_400_with_the_reason(base: str, body: Any, words: list[str]) -> None:
    assert_4xx(register(base, body), 400, *words)


def test_meta_at_consul_limits_is_accepted(base: str) -> None:
    name = unique("limits")
    meta = {f"k{i}": "v" for i in range(63)}
    meta["k" * 128] = "v" * 512
    resp = register(base, {"Name": name, "Meta": meta})
    assert resp.status_code == 200, resp.text
    assert requests.get(f"{base}/v1/agent/services", timeout=5).json()[name]["Meta"] == meta


def test_keys_match_case_insensitively_and_snake_case_aliases(base: str) -> None:
    name = unique("aliases")
    resp = register(base, {"name": name, "id": name, "PORT": 5, "check": {
        "grpc": "127.0.0.1:1", "interval": "1s", "grpc_use_tls": True, "tls_skip_verify": True,
        "deregister_critical_service_after": "90s", "timeout": 1_000_000_000}})
    assert resp.status_code == 200, resp.text
    check = requests.get(f"{base}/v1/agent/checks", timeout=5).json()[f"service:{name}"]
    assert check["Definition"]["GRPCUseTLS"] is True
    assert check["Definition"]["TLSSkipVerify"] is True
    assert check["Definition"]["DeregisterCriticalServiceAfter"] == "1m30s"
    assert check["Timeout"] == "1s"


def test_bodies_over_one_mib_get_413(base: str) -> None:
    big = json.dumps({"Name": "big", "Notes": "x" * (1024 * 1024 + 10)})
    assert_4xx(register(base, big), 413, "too large")
    resp = requests.put(f"{base}/v1/kv/big", data=b"x" * (512 * 1024 + 1), timeout=10)
    assert_4xx(resp, 413, "too large", "524288")
    assert requests.put(f"{base}/v1/kv/fits", data=b"x" * (512 * 1024), timeout=10).json() is True


@pytest.mark.parametrize("query, words", [
    ("index=abc", ["Invalid index"]),
    ("index=-1", ["Invalid index"]),
    ("index=%EF%BC%95", ["Invalid index"]),
    ("index=18446744073709551616", ["Invalid index"]),
    ("index=5&wait=soon", ["Invalid wait time"]),
    ("index=5&wait=10", ["Invalid wait time"]),
    ("passing=maybe", ["passing"]),
    ("filter=Service.Port%20%3D%3D", ["Failed to create boolean expression evaluator"]),
    ("filter=" + "(" * 3000, ["Failed to create boolean expression evaluator"]),
])
def test_bad_query_values_get_400(base: str, query: str, words: list[str]) -> None:
    resp = requests.get(f"{base}/v1/health/service/web?{query}", timeout=10)
    assert_4xx(resp, 400, *words)


def test_py_consul_raises_on_bad_wait_and_index(agent: DevAgent, base: str) -> None:
    c = agent.client()
    with pytest.raises(BadRequest, match="Invalid wait time"):
        c.health.service("web", index=3, wait="forever")
    with pytest.raises(BadRequest, match="Invalid index"):
        c.kv.get("k", index="x")
    with pytest.raises(BadRequest, match="unknown field"):
        c.agent.service.register("x", check={"TTL": "1s", "NotAField": 1})


def test_unknown_check_and_service_ids(agent: DevAgent, base: str) -> None:
    c = agent.client()
    resp = requests.put(f"{base}/v1/agent/check/pass/no-such-check", timeout=5)
    assert_4xx(resp, 404, 'Unknown check ID "no-such-check"')
    assert c.agent.check.ttl_pass("no-such-check") is False  # py-consul: 404 → False
    name = unique("nottl")
    c.agent.service.register(name, check=consul.Check.grpc("127.0.0.1:1", "1s"))
    with pytest.raises(consul.ConsulException, match="does not have associated TTL"):
        c.agent.check.ttl_pass(f"service:{name}")
    assert_4xx(requests.put(f"{base}/v1/agent/service/deregister/nope", timeout=5), 404,
               "Unknown service ID")
    assert_4xx(requests.put(f"{base}/v1/agent/service/maintenance/nope?enable=true", timeout=5),
               404, "nope")
    assert_4xx(requests.put(f"{base}/v1/agent/service/maintenance/{name}", timeout=5), 400,
               "Missing value for enable")
    assert_4xx(requests.put(f"{base}/v1/agent/service/maintenance/{name}?enable=perhaps",
                            timeout=5), 400, "Invalid value for enable")


def test_kv_and_routing_oddities(base: str) -> None:
    assert_4xx(requests.put(f"{base}/v1/kv/a?cas=x", data=b"1", timeout=5), 400, "cas")
    assert_4xx(requests.put(f"{base}/v1/kv/a?flags=-2", data=b"1", timeout=5), 400, "flags")
    assert_4xx(requests.put(f"{base}/v1/kv/", data=b"1", timeout=5), 400, "Missing key name")
    assert_4xx(requests.put(f"{base}/v1/kv/a?acquire=s", data=b"1", timeout=5), 400,
               "not supported")
    assert requests.get(f"{base}/v1/no/such/route", timeout=5).status_code == 404
    assert requests.post(f"{base}/v1/agent/service/register", data=b"{}",
                         timeout=5).status_code == 405
    assert_4xx(requests.get(f"{base}/v1/health/service/web?dc=elsewhere", timeout=5), 500,
               "No path to datacenter")


def test_protocol_abuse_gets_400_and_the_agent_survives(agent: DevAgent, base: str) -> None:
    import socket

    resp = requests.get(f"{base}/v1/kv/{'a' * 20000}", timeout=5)
    assert resp.status_code in (400, 414), resp.status_code
    resp = requests.put(f"{base}/v1/kv/x", data=b"1", timeout=5,
                        headers={f"X-H{i}": "v" * 100 for i in range(200)})
    assert resp.status_code in (400, 431), resp.status_code
    with socket.create_connection(("127.0.0.1", agent.port), timeout=5) as sock:
        sock.sendall(b"\x00\xff garbage\r\n\r\n")
        assert sock.recv(64).startswith(b"HTTP/1.")  # an answer (400), not a hang
    resp = requests.put(f"{base}/v1/agent/service/register", timeout=5,
                        data=b'{"Name": "x", "Meta": {"a": "\xff\xfe"}}')
    assert_4xx(resp, 400, "Request decode failed")
