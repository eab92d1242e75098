"""The dev agent's ACL policies and tokens (Consul's /v1/acl API and rules), driven by py-consul."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import consul
import pytest
import requests

from tests.conftest import DevAgent
from tests.integration.test_dev_agent import FAST_FLAGS

DETECTOR_RULES = {
    "service": {"meshserve-detector": {"policy": "write"}},
    "service_prefix": {"": {"policy": "read"}},
    "node_prefix": {"": {"policy": "read"}},
}
KV_RULES_HCL = """
# read everything, write one prefix, but not its secret corner; one exact key beats them all
key_prefix "" { policy = "read" }
key_prefix "meshserve/rollout/" { policy = "write" }
key_prefix "meshserve/rollout/secret/" { policy = "deny" }
key "meshserve/rollout/secret/open" { policy = "write" }
"""


def _ttl_check() -> dict[str, str]:
    return {"TTL": "60s", "Status": "passing"}


def test_bootstrap_policies_tokens_and_most_specific_rule(
    start_dev_agent: Callable[..., DevAgent],
) -> None:
    agent = start_dev_agent(["--acl-enabled", *FAST_FLAGS])
    anon = agent.client()
    boot = anon.acl.bootstrap()
    assert boot["Description"] == "Bootstrap Token (Global Management)"
    assert boot["Policies"] == [{"ID": "00000000-0000-0000-0000-000000000001", "Name": "global-management"}]
    with pytest.raises(consul.ACLPermissionDenied, match=r"ACL bootstrap no longer allowed \(reset index: \d+\)"):
        anon.acl.bootstrap()
    admin = agent.client(token=boot["SecretID"])

    policy = admin.acl.policy.create("detector", rules=DETECTOR_RULES, description="the detector")
    assert policy["Name"] == "detector" and policy["ID"] and policy["CreateIndex"] > 0
    assert admin.acl.policy.read(policy["ID"])["Description"] == "the detector"
    base = agent.http_addr
    hcl = requests.put(f"{base}/v1/acl/policy", headers={"X-Consul-Token": boot["SecretID"]}, timeout=5,
                       json={"Name": "rollout-writer", "Rules": KV_RULES_HCL}).json()
    assert hcl["Rules"] == KV_RULES_HCL
    assert {p["Name"] for p in admin.acl.policy.list()} == {"global-management", "detector", "rollout-writer"}
    assert all("Rules" not in p for p in admin.acl.policy.list())
    with pytest.raises(consul.ConsulException, match="already exists"):
        admin.acl.policy.create("detector")
    bad = requests.put(f"{base}/v1/acl/policy", headers={"X-Consul-Token": boot["SecretID"]}, timeout=5,
                       json={"Name": "broken", "Rules": 'service "x" { policy = "sometimes" }'})
    assert bad.status_code == 400 and "failed to parse rules" in bad.text

    det = admin.acl.token.create(policies_name=["detector"], description="detector replica")
    assert det["Policies"] == [{"ID": policy["ID"], "Name": "detector"}]
    detector = agent.client(token=det["SecretID"])
    assert detector.acl.token.read_self()["AccessorID"] == det["AccessorID"]

    # its own service: yes; another's: 403 naming the token, the permission and the service
    assert detector.agent.service.register("meshserve-detector", service_id="d1", check=_ttl_check())
    with pytest.raises(consul.ACLPermissionDenied) as denied:
        detector.agent.service.register("meshserve-indexer", service_id="i1", check=_ttl_check())
    assert str(denied.value) == (f"Permission denied: token with AccessorID '{det['AccessorID']}' lacks "
                                 "permission 'service:write' on \"meshserve-indexer\"")
    with pytest.raises(consul.ACLPermissionDenied, match="lacks permission 'key:write' on \"meshserve/config/x\""):
        detector.kv.put("meshserve/config/x", "1")
    assert [e["Service"]["ID"] for e in detector.health.service("meshserve-detector")[1]] == ["d1"]

    # most specific rule wins: exact key > longest prefix > shorter prefix
    writer = agent.client(token=admin.acl.token.create(policies_name=["rollout-writer"])["SecretID"])
    assert writer.kv.put("meshserve/rollout/det", "v2")
    with pytest.raises(consul.ACLPermissionDenied, match="key:write"):
        writer.kv.put("meshserve/rollout/secret/k", "x")
    assert writer.kv.put("meshserve/rollout/secret/open", "x")
    with pytest.raises(consul.ACLPermissionDenied, match="key:write"):
        writer.kv.put("meshserve/config/x", "1")
    admin.kv.put("meshserve/rollout/secret/k", "hidden")
    admin.kv.put("meshserve/config/x", "1")
    with pytest.raises(consul.ACLPermissionDenied, match="key:read"):
        writer.kv.get("meshserve/rollout/secret/k")
    resp = requests.get(f"{base}/v1/kv/meshserve/?recurse", headers={"X-Consul-Token": writer.token}, timeout=5)
    assert sorted(e["Key"] for e in resp.json()) == [
        "meshserve/config/x", "meshserve/rollout/det", "meshserve/rollout/secret/open"]
    assert resp.headers["X-Consul-Results-Filtered-By-ACLs"] == "true"

    # anonymous: nothing unless given a policy; an unknown token: ACL not found
    index, services = anon.catalog.services()
    assert services == {}
    resp = requests.get(f"{base}/v1/catalog/services", timeout=5)
    assert resp.json() == {} and resp.headers["X-Consul-Results-Filtered-By-ACLs"] == "true"
    assert anon.health.service("meshserve-detector")[1] == []
    with pytest.raises(consul.ACLPermissionDenied, match="^Permission denied: anonymous token lacks"):
        anon.agent.service.register("meshserve-detector", service_id="d2", check=_ttl_check())
    with pytest.raises(consul.ACLPermissionDenied, match="ACL not found"):
        agent.client(token="no-such-token").catalog.services()
    for how in ({"headers": {"Authorization": "Bearer no-such-token"}}, {"params": {"token": "no-such-token"}}):
        resp = requests.get(f"{base}/v1/catalog/services", timeout=5, **how)  # type: ignore[arg-type]
        assert resp.status_code == 403 and resp.text == "ACL not found"
    admin.acl.token.update("00000000-0000-0000-0000-000000000002", policies_name=["detector"])
    assert "meshserve-detector" in anon.catalog.services()[1]

    # ACL endpoints need acl:read / acl:write
    with pytest.raises(consul.ACLPermissionDenied, match="acl:write"):
        detector.acl.policy.create("mine", rules={"key_prefix": {"": {"policy": "write"}}})
    with pytest.raises(consul.ACLPermissionDenied, match="acl:read"):
        detector.acl.token.list()
    tokens = admin.acl.token.list()
    assert det["AccessorID"] in {t["AccessorID"] for t in tokens}
    assert admin.acl.token.delete(det["AccessorID"]) is True
    with pytest.raises(consul.ACLPermissionDenied, match="ACL not found"):
        detector.kv.get("meshserve/config/x")


def test_management_flag_token_and_acl_state_survive_restart(
    start_dev_agent: Callable[..., DevAgent], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    agent = start_dev_agent(["--acl-token", "root-secret", *FAST_FLAGS], data_dir=data)
    admin = agent.client(token="root-secret")
    with pytest.raises(consul.ACLPermissionDenied, match="bootstrap no longer allowed"):
        agent.client().acl.bootstrap()  # the configured management token counts as the bootstrap
    admin.acl.policy.create("reader", rules={"service_prefix": {"": {"policy": "read"}},
                                             "node_prefix": {"": {"policy": "read"}}})
    token = admin.acl.token.create(policies_name=["reader"])
    agent.stop()

    agent = start_dev_agent(["--acl-token", "root-secret", *FAST_FLAGS], data_dir=data)
    admin = agent.client(token="root-secret")
    reader = agent.client(token=token["SecretID"])
    assert admin.acl.policy.list() and reader.acl.token.read_self()["Policies"][0]["Name"] == "reader"
    admin.agent.service.register("meshserve-gateway", service_id="g1", check=_ttl_check())
    assert [e["Service"]["ID"] for e in reader.health.service("meshserve-gateway", passing=True)[1]] == ["g1"]
    with pytest.raises(consul.ACLPermissionDenied, match="service:write"):
        reader.agent.service.deregister("g1")


def test_acl_api_without_acls_is_disabled(start_dev_agent: Callable[..., DevAgent]) -> None:
    agent = start_dev_agent(FAST_FLAGS)
    with pytest.raises(consul.ACLDisabled, match="ACL support disabled"):
        agent.client().acl.policy.list()
    assert agent.client().kv.put("k", "v")  # everything else as before: no ACLs at all


def test_acl_cli_bootstraps_creates_policies_and_tokens(
    start_dev_agent: Callable[..., DevAgent], tmp_path: Path
) -> None:
    import os
    import subprocess

    from tests.support import meshserve_argv

    agent = start_dev_agent(["--acl-enabled", *FAST_FLAGS])
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")}
    env.update(CONSUL_HTTP_ADDR=agent.http_addr, MESHSERVE_HOME=str(tmp_path))

    def cli(*args: str, stdin: str | None = None, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(meshserve_argv("acl", *args), input=stdin, capture_output=True, text=True,
                              timeout=60, env={**env, **extra})  # fmt: skip

    boot = cli("bootstrap", "--out", str(tmp_path / "mgmt.token"))
    assert boot.returncode == 0, boot.stderr
    assert "global-management" in boot.stdout and (tmp_path / "mgmt.token").stat().st_mode & 0o777 == 0o600
    again = cli("bootstrap")
    assert again.returncode != 0 and "bootstrap no longer allowed" in again.stderr
    mgmt = {"CONSUL_HTTP_TOKEN_FILE": str(tmp_path / "mgmt.token")}
    created = cli("policy", "create", "--name", "meshserve-detector", "--rules", "-",
                  stdin='service "meshserve-detector" { policy = "write" }\n', **mgmt)
    assert created.returncode == 0, created.stderr
    token = cli("token", "create", "--policy", "meshserve-detector", "--out", str(tmp_path / "det.token"), **mgmt)
    assert token.returncode == 0, token.stderr
    listed = cli("token", "list", "--json", **mgmt)
    assert any(t.get("Policies", [{}])[0].get("Name") == "meshserve-detector" for t in json.loads(listed.stdout))
    detector = agent.client(token=(tmp_path / "det.token").read_text().strip())
    assert detector.agent.service.register("meshserve-detector", service_id="d", check=_ttl_check())
    with pytest.raises(consul.ACLPermissionDenied):
        detector.agent.service.register("meshserve-gateway", service_id="g", check=_ttl_check())
    refused = cli("policy", "list", CONSUL_HTTP_TOKEN_FILE=str(tmp_path / "det.token"))
    assert refused.returncode != 0 and "lacks permission 'acl:read'" in refused.stderr
    broken = cli("policy", "create", "--name", "bad", "--rules", "-", stdin="service {", **mgmt)
    assert broken.returncode != 0 and "failed to parse rules" in broken.stderr
