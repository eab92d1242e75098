"""The registry client against a dev agent process: register, deregister, KV, ACL."""

from __future__ import annotations

import pytest

from meshserve.errors import FailedPrecondition, InvalidInput
from meshserve.registry import client
from meshserve.registry.config import RegistryConfig
from meshserve.registry.consul_http import open_consul
from meshserve.registry.watch import KVWatch, ServiceWatch
from tests.integration.registry_helpers import (
    CHECK_INTERVAL_S,
    FAST_WATCH,
    instance,
    start_health_target,
)


def config_for(agent, token: str | None = None) -> RegistryConfig:
    return RegistryConfig(http_addr=agent.http_addr, token=token, request_timeout_s=3)


async def test_register_puts_a_grpc_check_and_turns_passing_with_meta(dev_agent, spawn):
    config = config_for(dev_agent)
    _, port = start_health_target(spawn)
    inst = instance(port)
    await client.register(config, inst)

    async with ServiceWatch(config, inst.name, FAST_WATCH) as watch:
        snap = await watch.wait_for(lambda s: len(s.instances) == 1, timeout=CHECK_INTERVAL_S + 5)
    (seen,) = snap.instances
    assert (seen.id, seen.name, seen.address, seen.port) == (
        inst.instance_id, inst.name, "127.0.0.1", port,
    )  # fmt: skip
    assert dict(seen.meta) == inst.meta and set(seen.tags) == set(inst.tags)

    async with open_consul(config) as consul:
        checks = await consul.agent.checks()
        services = await consul.agent.services()
    check = checks[f"service:{inst.instance_id}"]
    assert check["Status"] == "passing" and check["ServiceID"] == inst.instance_id
    assert f"127.0.0.1:{port}" in check["Output"]  # the gRPC check went to this target
    assert services[inst.instance_id]["Meta"] == inst.meta

    # Registering again (a restarted server) replaces, it does not duplicate.
    await client.register(config, inst)
    assert [i.id for i in await client.passing_instances(config, inst.name)] in (
        [inst.instance_id], [],  # re-registered checks may start critical again
    )  # fmt: skip
    async with open_consul(config) as consul:
        assert list((await consul.agent.services()).keys()) == [inst.instance_id]


async def test_deregister_removes_instance_and_check_and_is_idempotent(dev_agent, spawn):
    config = config_for(dev_agent)
    _, port = start_health_target(spawn)
    inst = instance(port)
    await client.register(config, inst)
    async with ServiceWatch(config, inst.name, FAST_WATCH) as watch:
        await watch.wait_for(lambda s: len(s.instances) == 1, timeout=CHECK_INTERVAL_S + 5)
        await client.deregister(config, inst.instance_id)
        gone = await watch.wait_for(lambda s: not s.instances, timeout=3)
        assert not gone.stale
    async with open_consul(config) as consul:
        assert inst.instance_id not in await consul.agent.services()
        assert f"service:{inst.instance_id}" not in await consul.agent.checks()
        _, catalog = await consul.catalog.service(inst.name)
        assert catalog == []
    await client.deregister(config, inst.instance_id)  # already gone: not an error


async def test_kv_helpers_and_kv_watch_see_put_and_delete(dev_agent):
    config = config_for(dev_agent)
    await client.kv_put(config, "meshserve/classifier/nsfw/threshold", "0.7")
    await client.kv_put(config, "other/key", "not ours")
    assert await client.kv_get(config, "meshserve/classifier/nsfw/threshold") == "0.7"
    assert await client.kv_get(config, "meshserve/missing") is None

    async with KVWatch(config, "meshserve/", FAST_WATCH) as watch:
        assert dict(watch.values) == {"meshserve/classifier/nsfw/threshold": "0.7"}
        await client.kv_put(config, "meshserve/weights/embedder", '{"7": 90, "8": 10}')
        snap = await watch.wait_for(lambda s: "meshserve/weights/embedder" in s.values, timeout=3)
        assert snap.values["meshserve/weights/embedder"] == '{"7": 90, "8": 10}'
        await client.kv_delete(config, "meshserve/classifier/nsfw/threshold")
        snap = await watch.wait_for(
            lambda s: "meshserve/classifier/nsfw/threshold" not in s.values, timeout=3
        )
        assert dict(snap.values) == {"meshserve/weights/embedder": '{"7": 90, "8": 10}'}
        await client.kv_delete_prefix(config, "meshserve/")
        snap = await watch.wait_for(lambda s: not s.values, timeout=3)
        assert not snap.stale
    assert await client.kv_get_prefix(config, "meshserve/") == {}
    assert await client.kv_get(config, "other/key") == "not ours"
    with pytest.raises(InvalidInput):
        await client.kv_delete_prefix(config, "")


async def test_acl_token_is_required_for_writes_and_used_when_given(start_dev_agent, spawn):
    agent = start_dev_agent(extra_args=["--acl-token", "s3cret"])
    _, port = start_health_target(spawn)
    inst = instance(port)
    with pytest.raises(FailedPrecondition, match="CONSUL_HTTP_TOKEN"):
        await client.register(config_for(agent), inst)
    with pytest.raises(FailedPrecondition):
        await client.kv_put(config_for(agent), "meshserve/x", "1")
    config = config_for(agent, token="s3cret")
    await client.register(config, inst)
    async with ServiceWatch(config, inst.name, FAST_WATCH) as watch:
        await watch.wait_for(lambda s: len(s.instances) == 1, timeout=CHECK_INTERVAL_S + 5)
        # Without the token, reads are filtered rather than refused: nothing is visible.
        async with ServiceWatch(config_for(agent), inst.name, FAST_WATCH) as anonymous:
            assert anonymous.instances == () and not anonymous.stale
    await client.deregister(config, inst.instance_id)
