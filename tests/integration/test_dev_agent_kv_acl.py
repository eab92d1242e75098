"""The dev agent's KV store, ACL and persistence across restarts, driven by py-consul."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import consul
import pytest
import requests

from tests.conftest import DevAgent, module_dev_agent
from tests.integration.test_dev_agent import FAST_FLAGS, unique
from tests.support import ManagedProcess, free_port, meshserve_argv

agent = module_dev_agent(*FAST_FLAGS)


@pytest.fixture
def c(agent: DevAgent) -> consul.Consul:
    return agent.client()


# ---- KV --------------------------------------------------------------------------------------


def test_kv_put_get_flags_and_indexes(c: consul.Consul) -> None:
    p = unique("kv")
    assert c.kv.put(f"{p}/a", "one", flags=42) is True
    index, entry = c.kv.get(f"{p}/a")
    assert entry["Value"] == b"one" and entry["Flags"] == 42 and entry["Key"] == f"{p}/a"
    assert int(index) == entry["ModifyIndex"] == entry["CreateIndex"]
    assert c.kv.put(f"{p}/a", b"\x00\xffbinary")
    index2, entry = c.kv.get(f"{p}/a")
    assert entry["Value"] == b"\x00\xffbinary" and entry["Flags"] == 0  # no ?flags: 0
    assert int(index2) > int(index) and entry["CreateIndex"] == int(index)
    assert c.kv.put(f"{p}/empty", None)
    assert c.kv.get(f"{p}/empty")[1]["Value"] is None


def test_kv_recurse_keys_separator_and_delete_recurse(c: consul.Consul) -> None:
    p = unique("tree")
    for key in ("a", "b/c", "b/d/e", "f"):
        c.kv.put(f"{p}/{key}", key)
    c.kv.put(f"{p}x/other", "not under the prefix with the slash")
    index, entries = c.kv.get(f"{p}/", recurse=True)
    assert [e["Key"] for e in entries] == [f"{p}/a", f"{p}/b/c", f"{p}/b/d/e", f"{p}/f"]
    assert int(index) == max(e["ModifyIndex"] for e in entries)
    _, keys = c.kv.get(f"{p}/", keys=True)
    assert keys == [f"{p}/a", f"{p}/b/c", f"{p}/b/d/e", f"{p}/f"]
    _, keys = c.kv.get(f"{p}/", keys=True, separator="/")
    assert keys == [f"{p}/a", f"{p}/b/", f"{p}/f"]
    assert c.kv.delete(f"{p}/b", recurse=True) is True
    index_after, entries = c.kv.get(f"{p}/", recurse=True)
    assert [e["Key"] for e in entries] == [f"{p}/a", f"{p}/f"]
    assert int(index_after) > int(index)  # deletes move the prefix's index forward
    assert c.kv.delete(f"{p}/a") is True
    assert c.kv.get(f"{p}/a")[1] is None
    c.kv.delete(f"{p}/", recurse=True)
    assert c.kv.get(f"{p}/", recurse=True)[1] is None
    assert c.kv.get(f"{p}x/other")[1]["Value"] == b"not under the prefix with the slash"


def test_kv_cas_put_and_delete(c: consul.Consul) -> None:
    key = unique("cas")
    assert c.kv.put(key, "first", cas=0) is True
    assert c.kv.put(key, "again", cas=0) is False  # cas=0: only if absent
    _, entry = c.kv.get(key)
    modify = entry["ModifyIndex"]
    assert c.kv.put(key, "second", cas=modify + 1000) is False
    assert c.kv.put(key, "second", cas=modify) is True
    assert c.kv.get(key)[1]["Value"] == b"second"
    _, entry = c.kv.get(key)
    assert c.kv.delete(key, cas=entry["ModifyIndex"] - 1) is False
    assert c.kv.get(key)[1] is not None
    assert c.kv.delete(key, cas=entry["ModifyIndex"]) is True
    assert c.kv.get(key)[1] is None


def test_kv_blocking_get_wakes_on_put_and_on_create(c: consul.Consul) -> None:
    p = unique("kvblock")
    c.kv.put(f"{p}/cfg", "v1")
    index, _ = c.kv.get(f"{p}/cfg")
    threading.Timer(0.3, lambda: c.kv.put(f"{p}/cfg", "v2")).start()
    start = time.monotonic()
    new_index, entry = c.kv.get(f"{p}/cfg", index=index, wait="10s")
    assert entry["Value"] == b"v2" and int(new_index) > int(index)
    assert time.monotonic() - start < 5.0  # on the change, not at the 10 s wait

    index, entries = c.kv.get(f"{p}/", recurse=True)
    threading.Timer(0.3, lambda: c.kv.put(f"{p}/new", "x")).start()
    start = time.monotonic()
    new_index, entries = c.kv.get(f"{p}/", recurse=True, index=index, wait="10s")
    assert [e["Key"] for e in entries] == [f"{p}/cfg", f"{p}/new"]
    assert time.monotonic() - start < 5.0  # on the change, not at the 10 s wait

    index, missing = c.kv.get(f"{p}/later")
    assert missing is None
    threading.Timer(0.3, lambda: c.kv.put(f"{p}/later", "now")).start()
    new_index, entry = c.kv.get(f"{p}/later", index=index, wait="10s")
    assert entry is not None and entry["Value"] == b"now"

    index, _ = c.kv.get(f"{p}/cfg")
    start = time.monotonic()
    same, _ = c.kv.get(f"{p}/cfg", index=index, wait="500ms")
    assert same == index and 0.5 <= time.monotonic() - start < 5.0


# ---- ACL -------------------------------------------------------------------------------------


def test_acl_writes_need_the_token_and_list_reads_are_filtered(
    start_dev_agent: Callable[..., DevAgent],
) -> None:
    agent = start_dev_agent(["--acl-token", "s3cret", *FAST_FLAGS])
    anon = agent.client()
    admin = agent.client(token="s3cret")
    wrong = agent.client(token="not-it")
    with pytest.raises(consul.ACLPermissionDenied, match="Permission denied"):
        anon.agent.service.register("svc", check=consul.Check.ttl("60s"))
    with pytest.raises(consul.ACLPermissionDenied):
        anon.kv.put("k", "v")
    with pytest.raises(consul.ACLPermissionDenied, match="ACL not found"):
        wrong.kv.put("k", "v")
    assert admin.agent.service.register("svc", check={"TTL": "60s", "Status": "passing"})
    assert admin.kv.put("cfg/a", "1")
    with pytest.raises(consul.ACLPermissionDenied):
        anon.agent.check.ttl_pass("service:svc")
    with pytest.raises(consul.ACLPermissionDenied):
        anon.agent.service.deregister("svc")

    # list reads: filtered, not refused, and they say so
    base = f"http://127.0.0.1:{agent.port}"
    for path in ("/v1/health/service/svc", "/v1/catalog/services", "/v1/agent/services",
                 "/v1/kv/cfg/?recurse"):
        resp = requests.get(base + path, timeout=5)
        assert resp.status_code in (200, 404), path
        assert resp.headers.get("X-Consul-Results-Filtered-By-ACLs") == "true", path
    assert anon.health.service("svc")[1] == []
    assert anon.catalog.services()[1] == {}
    assert [e["Service"]["ID"] for e in admin.health.service("svc")[1]] == ["svc"]
    with pytest.raises(consul.ACLPermissionDenied):
        anon.kv.get("cfg/a")  # a single key is refused, not filtered
    # the token travels as X-Consul-Token, ?token= or Authorization: Bearer
    assert requests.get(base + "/v1/kv/cfg/a?token=s3cret", timeout=5).status_code == 200
    bearer = requests.put(base + "/v1/kv/cfg/b", data=b"2", timeout=5,
                          headers={"Authorization": "Bearer s3cret"})
    assert bearer.status_code == 200 and bearer.json() is True
    assert anon.status.leader() == "127.0.0.1:8300"


# ---- persistence -----------------------------------------------------------------------------


def test_state_survives_restart_and_indexes_never_go_back(
    start_dev_agent: Callable[..., DevAgent], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    agent = start_dev_agent(FAST_FLAGS, data_dir=data)
    c = agent.client()
    c.agent.service.register("persisted", service_id="p1", port=1234, meta={"shard": "7"},
                             check=consul.Check.ttl("60s"))
    c.agent.check.ttl_pass("service:p1", "fine")
    c.kv.put("meshserve/weights", "0.5", flags=3)
    c.kv.put("meshserve/gone", "x")
    c.kv.delete("meshserve/gone")
    health_index, _ = c.health.service("persisted")
    kv_index, _ = c.kv.get("meshserve/", recurse=True)
    agent.stop()

    agent = start_dev_agent(FAST_FLAGS, data_dir=data)
    c = agent.client()
    index, [entry] = c.health.service("persisted", passing=True)
    assert entry["Service"]["Meta"] == {"shard": "7"} and entry["Service"]["Port"] == 1234
    assert int(index) >= int(health_index)
    _, value = c.kv.get("meshserve/weights")
    assert value["Value"] == b"0.5" and value["Flags"] == 3
    assert c.kv.get("meshserve/gone")[1] is None
    assert int(c.kv.get("meshserve/", recurse=True)[0]) >= int(kv_index)
    # a write after the restart gets a larger index than anything seen before it
    c.kv.put("meshserve/weights", "0.6")
    assert int(c.kv.get("meshserve/weights")[0]) > int(kv_index)
    c.agent.service.register("persisted", service_id="p2", check=consul.Check.ttl("60s"))
    before_kill = int(c.health.service("persisted")[0])
    agent.proc.signal(signal.SIGKILL)  # no chance to save on the way out
    agent.proc.wait(10)
    agent.stop()

    agent = start_dev_agent(FAST_FLAGS, data_dir=data)
    c = agent.client()
    index, entries = c.health.service("persisted")
    assert sorted(e["Service"]["ID"] for e in entries) == ["p1", "p2"]
    assert int(index) >= before_kill
    c.agent.check.ttl_pass("service:p2")
    assert int(c.health.service("persisted")[0]) > before_kill


def test_in_memory_by_default(start_dev_agent: Callable[..., DevAgent], tmp_path: Path) -> None:
    agent = start_dev_agent(FAST_FLAGS)
    agent.client().kv.put("k", "v")
    agent.stop()
    agent = start_dev_agent(FAST_FLAGS)
    assert agent.client().kv.get("k")[1] is None
    assert list(tmp_path.glob("*.json")) == []


def test_damaged_or_shared_data_dir_is_refused_with_a_reason(
    start_dev_agent: Callable[..., DevAgent], spawn: Callable[..., ManagedProcess], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    agent = start_dev_agent(FAST_FLAGS, data_dir=data)
    second = spawn(meshserve_argv("registry", "dev", "--http-addr", f"127.0.0.1:{free_port()}",
                                  "--data-dir", str(data)), name="second")  # fmt: skip
    assert second.wait(20) != 0
    assert "in use by another dev agent" in second.output()
    second.stop()
    agent.stop()
    (data / "meshserve-dev-agent.json").write_text('{"version": 1, "index": "oops"}')
    broken = spawn(meshserve_argv("registry", "dev", "--http-addr", f"127.0.0.1:{free_port()}",
                                  "--data-dir", str(data)), name="broken")  # fmt: skip
    assert broken.wait(20) != 0
    assert "damaged" in broken.output() and "move it away" in broken.output()
    broken.stop()
