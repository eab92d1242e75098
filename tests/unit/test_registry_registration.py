"""Registration payloads and validation: what meshserve sends to Consul, checked before sending."""

from __future__ import annotations

import dataclasses

import pytest

from meshserve.errors import InvalidInput
from meshserve.registry.client import (
    INDEXER_META,
    deregister,
    go_duration,
    grpc_check,
    register,
    validate_instance,
)
from meshserve.registry.config import RegistryConfig, ServiceInstance
from meshserve.registry.consul_http import RegistryUnavailable
from meshserve.registry.instances import instances_from_health
from tests.support import free_port

EMBEDDER = ServiceInstance(
    name="meshserve-embedder",
    instance_id="meshserve-embedder-127.0.0.1-50051",
    address="127.0.0.1",
    port=50051,
    meta={"model": "embedder", "version": "3", "role": "embedder"},
    check_interval_s=0.5,
    check_timeout_s=1.0,
    deregister_critical_after_s=90,
    grpc_health_service="meshserve.v1.PredictionService",
)


@pytest.mark.parametrize(
    ("seconds", "expected"), [(1, "1s"), (0.5, "500ms"), (90, "90s"), (1.25, "1250ms"), (0, "1ms")]
)
def test_go_duration(seconds, expected):
    assert go_duration(seconds) == expected


def test_grpc_check_targets_the_health_service_with_interval_timeout_and_reaping():
    check = grpc_check(EMBEDDER)
    assert check["grpc"] == "127.0.0.1:50051/meshserve.v1.PredictionService"
    assert (check["interval"], check["timeout"]) == ("500ms", "1s")
    assert check["DeregisterCriticalServiceAfter"] == "90s"
    whole_server = grpc_check(dataclasses.replace(EMBEDDER, grpc_health_service="", address="::1"))
    assert whole_server["grpc"] == "[::1]:50051"


def test_valid_instance_passes():
    validate_instance(EMBEDDER)


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"instance_id": "a/b"}, "instance_id"),
        ({"address": ""}, "address is empty"),
        ({"port": 0}, "port 0"),
        ({"check_interval_s": 5.0}, "check_interval_s 5.0"),
        ({"check_timeout_s": 0}, "check_timeout_s"),
        ({"meta": {"model": "m", "version": "1"}}, "must carry meta role"),
        ({"meta": {**EMBEDDER.meta, "bad key": "x"}}, "'bad key'"),
        ({"meta": {**EMBEDDER.meta, "consul-x": "x"}}, "reserved"),
        ({"meta": {**EMBEDDER.meta, "big": "x" * 513}}, "longer than 512"),
        ({"meta": {**EMBEDDER.meta, **{f"k{i}": "v" for i in range(64)}}}, "pairs"),
    ],
)
def test_invalid_instances_are_refused_with_the_reason(change, complaint):
    with pytest.raises(InvalidInput, match=complaint):
        validate_instance(dataclasses.replace(EMBEDDER, **change))


def test_indexer_needs_its_shard_meta():
    indexer = dataclasses.replace(EMBEDDER, name="meshserve-indexer")
    with pytest.raises(InvalidInput) as info:
        validate_instance(indexer)
    assert all(key in str(info.value) for key in INDEXER_META)
    validate_instance(dataclasses.replace(indexer, meta={**EMBEDDER.meta, **{k: "1" for k in INDEXER_META}}))


def test_health_entries_parse_and_sort_and_fall_back_to_the_node_address():
    entries = [
        {
            "Node": {"Node": "n", "Address": "10.1.1.1"},
            "Service": {"ID": "z", "Service": "s", "Address": "", "Port": 2, "Meta": None},
        },
        {
            "Node": {"Node": "n", "Address": "10.1.1.1"},
            "Service": {
                "ID": "a",
                "Service": "s",
                "Address": "10.2.2.2",
                "Port": 1,
                "Meta": {"model": "m"},
                "Tags": ["x"],
            },
        },
    ]
    a, z = instances_from_health(entries)
    assert (a.id, a.address, a.port, dict(a.meta), a.tags) == ("a", "10.2.2.2", 1, {"model": "m"}, ("x",))
    assert (z.id, z.address, dict(z.meta)) == ("z", "10.1.1.1", {})
    with pytest.raises(TypeError):
        a.meta["model"] = "other"  # type: ignore[index]
    assert instances_from_health(None) == ()


async def test_unreachable_consul_is_a_clear_not_ready_error():
    config = RegistryConfig(http_addr=f"http://127.0.0.1:{free_port()}", request_timeout_s=1)
    with pytest.raises(RegistryUnavailable, match="unreachable"):
        await register(config, EMBEDDER)
    with pytest.raises(RegistryUnavailable, match="deregister"):
        await deregister(config, EMBEDDER.instance_id)


async def test_invalid_instance_is_refused_before_any_request():
    # Nothing listens on this port: the refusal must come from validation, not transport.
    config = RegistryConfig(http_addr=f"http://127.0.0.1:{free_port()}", request_timeout_s=1)
    with pytest.raises(InvalidInput, match="port"):
        await register(config, dataclasses.replace(EMBEDDER, port=70000))
