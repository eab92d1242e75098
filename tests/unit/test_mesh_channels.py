"""The gateway's channel factory: mTLS channels name the registered service, and a renewed client certificate
reopens every tracked replica set's channels, keeping what the balancer knows of each replica."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from meshserve.gateway.balancer import InstanceChannels, ReplicaSet
from meshserve.gateway.mesh_channels import MeshChannels
from meshserve.gateway.policy import CallPolicy
from meshserve.local.mesh_pki import MeshPki
from meshserve.registry.instances import Instance
from meshserve.rpc.tls_files import TlsFiles


def instances(n: int) -> list[Instance]:
    # ports nothing listens on: grpc connects lazily, and nothing here calls them
    return [Instance(id=f"r{i}", name="meshserve-detector", address="127.0.0.1", port=1 + i) for i in range(n)]


async def test_a_renewed_certificate_reopens_the_channels_and_keeps_the_replicas_state(tmp_path: Path) -> None:
    pki = MeshPki.prepare(tmp_path, secure=True)
    assert pki is not None
    channels = MeshChannels(TlsFiles.from_pki(pki.layout, "meshserve-gateway"))
    assert isinstance(channels, InstanceChannels) and channels.secure
    with pytest.raises(ValueError, match="for_instance"):
        channels("127.0.0.1:1")  # a TLS channel needs the service it is for
    replicas = ReplicaSet("detector", CallPolicy("meshserve-detector"), channels)
    replicas.update(instances(2))
    before = {r.id: r.channel for r in replicas.replicas}
    first = replicas.replicas[0]
    first.times_ejected, first.ejected_until = 2, 1e12
    follower = asyncio.create_task(channels.follow_renewals(every_s=0.02))
    try:
        await asyncio.sleep(0.1)
        assert {r.id: r.channel for r in replicas.replicas} == before  # nothing renewed: channels kept
        pki.renew_due(force=True)

        async def reopened() -> None:
            while any(r.channel is before[r.id] for r in replicas.replicas):
                await asyncio.sleep(0.02)

        await asyncio.wait_for(reopened(), timeout=10)
    finally:
        follower.cancel()
    again = {r.id: r for r in replicas.replicas}
    assert again["r0"].times_ejected == 2 and again["r0"].ejected_until == 1e12
    assert again["r0"].instance == first.instance
    await replicas.close()


async def test_plaintext_channels_are_never_reopened() -> None:
    channels = MeshChannels(None)
    assert not channels.secure
    replicas = ReplicaSet("detector", CallPolicy("meshserve-detector"), channels)
    replicas.update(instances(1))
    await asyncio.wait_for(channels.follow_renewals(every_s=0.01), timeout=1)  # returns at once: nothing to follow
    await replicas.close()
