"""Consul ACL rules as the dev agent reads them, and how clients find their token and TLS settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshserve.registry.acl_policies import workload_policies
from meshserve.registry.config import RegistryConfig
from meshserve.registry.dev.acl import AclStore
from meshserve.registry.dev.acl_rules import DENY, READ, WRITE, Rules, RulesError, parse_rules
from meshserve.registry.dev.schema import BadRequest

HCL = """
# comments of every kind
key_prefix "" { policy = "read" }      // trailing
key_prefix "app/" { policy = "write" }
/* block */ key_prefix "app/private/" { policy = "deny" }
key "app/private/open" { policy = "write" }
service "web" {
  policy = "write"
  intentions = "read"
}
node_prefix "" { policy = "read" }
acl = "read"
"""


def test_hcl_rules_and_the_most_specific_rule_wins() -> None:
    rules = parse_rules(HCL)
    assert rules.level("key", "other", DENY) == READ
    assert rules.level("key", "app/x", DENY) == WRITE
    assert rules.level("key", "app/private/x", DENY) == DENY
    assert rules.level("key", "app/private/open", DENY) == WRITE  # exact beats every prefix
    assert rules.level("service", "web", DENY) == WRITE
    assert rules.level("service", "webby", DENY) == DENY  # an exact rule is no prefix
    assert rules.level("node", "any", DENY) == READ
    assert rules.level("acl", None, DENY) == READ


def test_json_rules_equal_their_hcl() -> None:
    rules = parse_rules('{"service": {"web": {"policy": "write"}}, "key_prefix": {"": {"policy": "read"}},'
                        ' "operator": "read"}')
    assert rules.level("service", "web", DENY) == WRITE and rules.level("key", "k", DENY) == READ
    assert rules.level("operator", None, DENY) == READ


@pytest.mark.parametrize("text, message", [
    ('service "web" { policy = "sometimes" }', "Invalid rule policy"),
    ('service "web" { }', "needs policy"),
    ('services "web" { policy = "read" }', "Unknown ACL resource"),
    ('service "web" { policy = "read"', "unexpected end"),
    ('service "web" { policy = read }', "quoted value"),
    ('service "web" { colour = "red" policy = "read" }', "unknown key"),
    ('service_prefix "" { policy = "list" }', "only valid for key_prefix"),
    ("{not json", "invalid JSON"),
    ("service = 3", "unexpected"),
])  # fmt: skip
def test_bad_rules_are_refused_with_a_reason(text: str, message: str) -> None:
    with pytest.raises(RulesError, match=message):
        parse_rules(text)


def test_policies_merge_deny_first_then_write_over_read() -> None:
    merged = Rules()
    merged.merge(parse_rules('service "a" { policy = "read" }\nservice "b" { policy = "write" }'))
    merged.merge(parse_rules('service "a" { policy = "write" }\nservice "b" { policy = "deny" }'))
    assert merged.level("service", "a", DENY) == WRITE and merged.level("service", "b", DENY) == DENY


def test_tokens_resolve_to_what_their_policies_allow() -> None:
    acl = AclStore(enabled=True, initial_management="root")
    assert acl.resolve("root").management
    anonymous = acl.resolve("")
    assert anonymous.anonymous and not anonymous.can("service", "web", READ)
    with pytest.raises(BadRequest, match="ACL not found"):
        acl.resolve("unknown")
    acl.put_policy({"Name": "web", "Rules": 'service "web" { policy = "write" }'}, None)
    token = acl.put_token({"Policies": [{"Name": "web"}]}, None, None)
    caller = acl.resolve(token.secret_id)
    assert caller.can("service", "web", WRITE) and not caller.can("service", "db", READ)
    with pytest.raises(BadRequest, match=f"token with AccessorID '{token.accessor_id}' lacks permission "
                                         "'service:write' on \"db\""):  # fmt: skip
        caller.require("service", "db", WRITE)
    with pytest.raises(BadRequest, match="^Permission denied: token with AccessorID '[-0-9a-f]+' lacks permission "
                                         "'acl:read'$"):  # fmt: skip
        caller.require("acl", None, READ)
    acl.put_policy({"Name": "kv", "Rules": 'key_prefix "a/" { policy = "write" }\n'
                                          'key_prefix "a/secret/" { policy = "deny" }'}, None)
    kv = acl.resolve(acl.put_token({"Policies": [{"Name": "kv"}]}, None, None).secret_id)
    kv.require_prefix_write("key", "a/public/")
    with pytest.raises(BadRequest, match='on "a/secret/"'):  # a recursive delete may not reach what it may not write
        kv.require_prefix_write("key", "a/")
    restored = AclStore(enabled=True, initial_management="root")
    restored.restore(acl.snapshot())
    assert restored.resolve(token.secret_id).can("service", "web", WRITE)
    assert AclStore().resolve("anything").can("key", "k", WRITE)  # ACLs off: tokens mean nothing


def test_every_workload_policy_parses_and_a_server_may_write_only_itself() -> None:
    policies = {name: parse_rules(text) for name, text in workload_policies().items()}
    detector = policies["meshserve-detector"]
    assert detector.level("service", "meshserve-detector", DENY) == WRITE
    assert detector.level("service", "meshserve-indexer", DENY) == DENY
    assert detector.level("key", "meshserve/config/x", DENY) == DENY
    gateway = policies["meshserve-gateway"]
    assert gateway.level("service", "meshserve-indexer", DENY) == READ
    assert gateway.level("key", "meshserve/config/x", DENY) == READ
    operator = policies["meshserve-operator"]
    assert operator.level("key", "meshserve/rollout/x", DENY) == WRITE
    assert operator.level("key", "meshserve/config/x", DENY) == WRITE
    # `shard retire` marks a shard (operator); indexers read the mark, and nobody else needs to
    assert operator.level("key", "meshserve/shards/retired/day-1", DENY) == WRITE
    indexer = policies["meshserve-indexer"]
    assert indexer.level("key", "meshserve/shards/retired/day-1", DENY) == READ
    assert indexer.level("key", "meshserve/config/x", DENY) == DENY
    assert detector.level("key", "meshserve/shards/retired/day-1", DENY) == DENY


def test_client_token_and_tls_from_consul_variables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("CONSUL_HTTP_TOKEN", "CONSUL_HTTP_TOKEN_FILE", "CONSUL_HTTP_SSL", "CONSUL_CACERT",
                 "CONSUL_CLIENT_CERT", "CONSUL_CLIENT_KEY", "CONSUL_TLS_SERVER_NAME", "CONSUL_HTTP_SSL_VERIFY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MESHSERVE_HOME", str(tmp_path))
    (tmp_path / "acl").mkdir()
    (tmp_path / "acl" / "operator.token").write_text("local-secret\n")
    (tmp_path / "acl" / "registry").write_text("http://127.0.0.1:8500\n")
    assert RegistryConfig.from_env("127.0.0.1:8500").token == "local-secret"  # this home's mesh
    assert RegistryConfig.from_env("http://10.0.0.9:8500").token is None  # never sent elsewhere
    (tmp_path / "mine.token").write_text("from-file\n")
    monkeypatch.setenv("CONSUL_HTTP_TOKEN_FILE", str(tmp_path / "mine.token"))
    assert RegistryConfig.from_env("127.0.0.1:8500").token == "from-file"
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "from-env")
    assert RegistryConfig.from_env("127.0.0.1:8500").token == "from-env"
    monkeypatch.setenv("CONSUL_HTTP_TOKEN_FILE", str(tmp_path / "missing"))
    monkeypatch.delenv("CONSUL_HTTP_TOKEN")
    with pytest.raises(ValueError, match="CONSUL_HTTP_TOKEN_FILE"):
        RegistryConfig.from_env("127.0.0.1:8500")
    monkeypatch.delenv("CONSUL_HTTP_TOKEN_FILE")

    monkeypatch.setenv("CONSUL_HTTP_SSL", "true")
    monkeypatch.setenv("CONSUL_TLS_SERVER_NAME", "consul.internal")
    config = RegistryConfig.from_env("http://127.0.0.1:8501")
    assert config.http_addr == "https://127.0.0.1:8501" and config.server_hostname() == "consul.internal"
    assert config.ssl_context() is not None
    monkeypatch.setenv("CONSUL_CLIENT_CERT", "/only/the/cert.pem")
    with pytest.raises(ValueError, match="CONSUL_CLIENT_CERT and CONSUL_CLIENT_KEY"):
        RegistryConfig.from_env("127.0.0.1:8501")
    monkeypatch.setenv("CONSUL_HTTP_SSL", "maybe")
    with pytest.raises(ValueError, match="CONSUL_HTTP_SSL"):
        RegistryConfig.from_env("127.0.0.1:8501")


def test_an_expired_token_is_not_found_and_bootstrap_happens_once() -> None:
    acl = AclStore(enabled=True)
    boot = acl.bootstrap(None)
    assert acl.resolve(boot.secret_id).management
    with pytest.raises(BadRequest, match=r"ACL bootstrap no longer allowed \(reset index: \d+\)"):
        acl.bootstrap(None)
    token = acl.put_token({}, None, ttl_s=60.0)
    acl.resolve(token.secret_id)
    assert token.expiration_time is not None
    token.expiration_time -= 61.0  # (as if a minute went by)
    with pytest.raises(BadRequest, match="^ACL not found$"):
        acl.resolve(token.secret_id)
