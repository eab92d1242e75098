"""bench/gateway.py part (d): photo search through a plaintext mesh and an mTLS mesh, up side by side.

Both meshes run the same models and one shard (1 detector, 1 embedder, 1 indexer, the gateway), each from its
own MESHSERVE_HOME that links the models, catalogue and shards of --home; the same photos are searched through
both, interleaved query by query with the order alternating, so outside load falls on both alike. Beside the
search (4 hops one after another: client→gateway→detector, →embedder, →shard), an empty round trip (health
Check over a kept channel) to each mesh process measures one hop. Goal: ≤ 10 % added p50 per hop.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshserve.v1 import photo_search_pb2_grpc

ROLES = ("gateway", "detector", "embedder", "indexer")


@dataclass(frozen=True)
class Tools:
    """What bench/gateway.py lends this part (it runs as a script, so it cannot be imported back)."""

    free_port: Callable[[], int]
    interleaved: Callable[..., dict[str, Any]]
    search_request: Callable[[bytes, float], Any]
    timeout_s: float


def _linked_home(home: Path) -> Path:
    """A MESHSERVE_HOME of its own (run dir, pki) whose models, catalogue and caches are --home's."""
    own = Path(tempfile.mkdtemp(prefix="bench-tls-home-"))
    for entry in home.iterdir():
        if entry.name not in ("up", "pki", "demo"):
            (own / entry.name).symlink_to(entry)
    return own


class Side:
    """One mesh and kept channels to its gateway and model servers (mTLS when `tls`)."""

    def __init__(self, info: Any, pki: Any, min_score: float, tools: Tools):
        from meshserve.registry.config import SERVICE_NAMES
        from meshserve.rpc import tls
        from meshserve.rpc.tls_files import TlsFiles

        files = TlsFiles.from_pki(pki.layout, "cli") if pki is not None else None
        endpoints = [e for e in info.endpoints if e.role in ROLES]
        self.channels = {e.name: tls.channel(e.target, SERVICE_NAMES[e.role], [], files) for e in endpoints}
        self.search_stub = photo_search_pb2_grpc.PhotoSearchStub(self.channels["gateway"])
        self.health = {name: health_pb2_grpc.HealthStub(c) for name, c in self.channels.items()}
        self.min_score = min_score
        self.tools = tools

    def search(self, image: bytes) -> int:
        request = self.tools.search_request(image, self.min_score)
        reply = self.search_stub.Search(request, timeout=self.tools.timeout_s)
        if reply.coverage.shards_answered != 1:
            raise RuntimeError(f"coverage {reply.coverage.shards_answered}/{reply.coverage.shards_expected}")
        return len(reply.detections)

    def hop(self, _image: bytes) -> int:
        for stub in self.health.values():
            stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
        return len(self.health)

    def close(self) -> None:
        for channel in self.channels.values():
            channel.close()


def tls_on_off(home: Path, photos: Sequence[bytes], min_score: float, warmup: int, ready_timeout_s: float,
               say: Callable[[str], None], tools: Tools) -> list[str]:  # fmt: skip
    from meshserve.local.mesh import LocalMesh, MeshConfig

    free_port, interleaved = tools.free_port, tools.interleaved

    meshes: dict[str, LocalMesh] = {}
    sides: dict[str, Side] = {}
    homes = {name: _linked_home(home) for name in ("plaintext", "mtls")}
    try:
        for name, linked in homes.items():
            config = MeshConfig(home=linked, registry_addr=f"127.0.0.1:{free_port()}",
                                gateway_addr=f"127.0.0.1:{free_port()}", detectors=1, embedders=1, shards=1,
                                threads=1, ready_timeout_s=ready_timeout_s, secure=name == "mtls")  # fmt: skip
            meshes[name] = mesh = LocalMesh(config, say=lambda line, n=name: say(f"  {n} mesh: {line}"))
            started = time.monotonic()
            info = mesh.start()
            say(f"(d) {name} mesh up in {time.monotonic() - started:.0f}s")
            sides[name] = Side(info, mesh.pki, min_score, tools)
        say(f"(d) {len(photos)} photos through both meshes, interleaved …")
        searches = interleaved({n: s.search for n, s in sides.items()}, photos, warmup)
        rounds = [b"" for _ in range(max(20, len(photos)))]
        hops = interleaved({n: s.hop for n, s in sides.items()}, rounds, 4)
    finally:
        for side in sides.values():
            side.close()
        for mesh in meshes.values():
            mesh.stop()
        for linked in homes.values():
            shutil.rmtree(linked, ignore_errors=True)
    per_hop = {n: len(ROLES) for n in hops}
    plain, secure = searches["plaintext"], searches["mtls"]
    hop_plain, hop_secure = hops["plaintext"], hops["mtls"]

    def added(on: float, off: float) -> str:
        return f"{(on / off - 1) * 100:+.1f} %"

    return [
        "",
        f"(d) mTLS on vs off: two meshes up side by side (S=1, 1 detector, 1 embedder), {len(photos)} photos "
        "interleaved (ms)",
        f"{'side':<36} {'p50':>8} {'p99':>8}",
        f"{'search, plaintext mesh (baseline)':<36} {1000 * plain.p50:8.1f} {1000 * plain.p99:8.1f}",
        f"{'search, mTLS mesh':<36} {1000 * secure.p50:8.1f} {1000 * secure.p99:8.1f}   "
        f"p50 {added(secure.p50, plain.p50)}, p99 {added(secure.p99, plain.p99)}",
        f"{'one hop (health Check), plaintext':<36} {1000 * hop_plain.p50 / per_hop['plaintext']:8.2f} "
        f"{1000 * hop_plain.p99 / per_hop['plaintext']:8.2f}   (mean of the {len(ROLES)} processes' round trips)",
        f"{'one hop (health Check), mTLS':<36} {1000 * hop_secure.p50 / per_hop['mtls']:8.2f} "
        f"{1000 * hop_secure.p99 / per_hop['mtls']:8.2f}   p50 {added(hop_secure.p50, hop_plain.p50)} per hop "
        f"(goal ≤ +10 %)",
    ]
