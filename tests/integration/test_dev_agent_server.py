"""What the dev agent says about itself, read with the unmodified py-consul client as a Consul client
would: /v1/agent/self carries Stats with the leader's address, the `consul` service is in the catalog
(and healthy, and not a local service), members, datacenters and nodes answer like a one-server Consul."""

from __future__ import annotations

import threading
import time
import uuid

import consul
import requests

from tests.conftest import DevAgent, module_dev_agent

agent = module_dev_agent()


def test_agent_self_has_consuls_sections_and_the_leader_address_of_status_leader(agent: DevAgent) -> None:
    c = agent.client()
    me = c.agent.self()
    assert {"Config", "DebugConfig", "Coord", "Member", "Stats", "Meta"} <= set(me)
    assert me["Stats"]["consul"]["leader_addr"] == c.status.leader() == "127.0.0.1:8300"
    assert me["Stats"]["consul"]["leader"] == "true" and me["Stats"]["consul"]["server"] == "true"
    # Consul's Stats are maps of strings
    assert all(isinstance(v, str) for section in me["Stats"].values() for v in section.values())
    assert {"agent", "build", "consul", "raft", "runtime", "serf_lan"} <= set(me["Stats"])
    assert me["Config"]["Datacenter"] == "dc1" and me["Config"]["Server"] is True
    assert me["Member"]["Name"] == me["Config"]["NodeName"] and me["Member"]["Addr"] == "127.0.0.1"
    assert me["Meta"]["consul-version"] == me["Config"]["Version"]
    assert len(me["Coord"]["Vec"]) == 8
    assert c.status.peers() == [c.status.leader()]


def test_the_consul_service_is_in_the_catalog_and_healthy_but_not_local(agent: DevAgent) -> None:
    c = agent.client()
    name = f"other-{uuid.uuid4().hex[:8]}"
    c.agent.service.register(name, service_id=name, port=9)
    _, services = c.catalog.services()
    assert services["consul"] == [] and name in services
    _, [entry] = c.catalog.service("consul")
    assert entry["ServiceID"] == entry["ServiceName"] == "consul" and entry["ServicePort"] == 8300
    assert entry["Node"] == c.agent.self()["Config"]["NodeName"]
    index, [healthy] = c.health.service("consul", passing=True)
    assert healthy["Service"]["ID"] == "consul"
    assert [check["CheckID"] for check in healthy["Checks"]] == ["serfHealth"]
    assert "consul" not in c.agent.services()
    assert c.health.checks("consul")[1] == []  # serfHealth is the node's, not the service's
    # a blocking query on it waits like any other (nothing changed: same index after the wait)
    assert c.health.service("consul", index=index, wait="200ms")[0] == index
    # the node in maintenance: the consul service is not passing either, as in Consul
    c.agent.maintenance(True, "test")
    try:
        assert c.health.service("consul", passing=True)[1] == []
    finally:
        c.agent.maintenance(False)
    assert len(c.health.service("consul", passing=True)[1]) == 1
    c.agent.service.deregister(name)
    assert "consul" in c.catalog.services()[1]


def test_members_datacenters_and_nodes_describe_the_one_server(agent: DevAgent) -> None:
    c = agent.client()
    [member] = c.agent.members()
    assert member["Name"] == c.agent.self()["Config"]["NodeName"] and member["Tags"]["role"] == "consul"
    assert c.catalog.datacenters() == ["dc1"]
    index, [node] = c.catalog.nodes()
    assert int(index) >= 1 and node["Node"] == member["Name"] and node["Address"] == "127.0.0.1"


def test_an_anonymous_client_is_refused_agent_self_when_acls_are_on(start_dev_agent) -> None:  # type: ignore[no-untyped-def]
    secured = start_dev_agent(extra_args=["--acl-token", "s3cret"])
    try:
        secured.client().agent.self()
    except consul.ACLPermissionDenied:
        pass
    else:
        raise AssertionError("agent/self answered an anonymous client")
    # (py-consul's agent.self() sends no token, so with a token: plain HTTP)
    me = requests.get(f"{secured.http_addr}/v1/agent/self", headers={"X-Consul-Token": "s3cret"}, timeout=5).json()
    assert me["Stats"]["consul"]["acl"] == "enabled"


def test_checks_by_state_and_by_node_and_the_node_catalog_answer_and_block(agent: DevAgent) -> None:
    c = agent.client()
    node = c.agent.self()["Config"]["NodeName"]
    name = f"bystate-{uuid.uuid4().hex[:8]}"
    c.agent.service.register(name, service_id=name, port=5, check=consul.Check.ttl("60s"))
    check_id = f"service:{name}"
    index, critical = c.health.state("critical")
    assert check_id in {ch["CheckID"] for ch in critical}  # a new check starts critical
    assert {"serfHealth", check_id} <= {ch["CheckID"] for ch in c.health.state("any")[1]}
    # a blocking read over every check wakes on this one's change
    threading.Timer(0.3, lambda: c.agent.check.ttl_pass(check_id)).start()
    started = time.monotonic()
    new_index, passing = c.health.state("passing", index=index, wait="10s")
    assert int(new_index) > int(index) and time.monotonic() - started < 5.0
    assert check_id in {ch["CheckID"] for ch in passing}
    # nothing changes: it waits the wait out and answers the same index
    assert c.health.state("passing", index=new_index, wait="300ms")[0] == new_index
    assert {"serfHealth", check_id} <= {ch["CheckID"] for ch in c.health.node(node)[1]}
    assert c.health.node("no-such-node")[1] == []
    _, entry = c.catalog.node(node)
    assert entry["Node"]["Node"] == node and {"consul", name} <= set(entry["Services"])
    assert c.catalog.node("no-such-node")[1] is None
    bad = requests.get(f"{agent.http_addr}/v1/health/state/sideways", timeout=5)
    assert bad.status_code == 400 and "Invalid state" in bad.text
    c.agent.service.deregister(name)
