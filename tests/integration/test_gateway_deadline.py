"""Deadlines through the mesh: a detector slowed past the caller's 50 ms deadline gives the caller
DEADLINE_EXCEEDED promptly, the gateway says so too, the detector sees the caller's shortened
deadline (not a default one), and it drops the expired work."""

from __future__ import annotations

import signal
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from meshserve.local.demo import held_out_photos
from meshserve.local.mesh import LocalMesh, MeshConfig
from meshserve.local.supervisor import ChildSpec
from meshserve.v1 import photo_search_pb2, photo_search_pb2_grpc
from tests.support import free_port, wait_until

# The mesh may take its ready_timeout (240 s) and the slow detector 120 s more to come up.
pytestmark = pytest.mark.timeout(600)


def metric(port: int, name: str, labels: str = "") -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and labels in line and not line.startswith("#"))  # fmt: skip


def histogram(port: int, name: str, le: str) -> tuple[float, float]:
    """(observations ≤ `le`, all observations) of a histogram."""
    return metric(port, f"{name}_bucket", f'le="{le}"'), metric(port, f"{name}_count")


def gateway_ended_at_deadline(port: int) -> float:
    """Searches the gateway ended as DEADLINE_EXCEEDED, or CANCELLED when the caller's own deadline won the race."""
    return sum(metric(port, "meshserve_gateway_requests_total", f'code="{code}"')
               for code in ("DEADLINE_EXCEEDED", "CANCELLED"))  # fmt: skip


@pytest.fixture(scope="module")
def slow_mesh(home_copy: Callable[[], Path]) -> Iterator[tuple[LocalMesh, int]]:
    """One detector slowed to 300 ms per call (and the normal one gone), one embedder, one shard."""
    config = MeshConfig(home=home_copy(), registry_addr=f"127.0.0.1:{free_port()}",
                        gateway_addr=f"127.0.0.1:{free_port()}", gateway_metrics_port=free_port(),
                        detectors=1, embedders=1, shards=1, ready_timeout_s=240)  # fmt: skip
    mesh = LocalMesh(config, say=lambda line: None)
    try:
        mesh.start()
        slow_metrics = free_port()
        port_file = config.run_dir / "ports" / "slow-detector.port"
        slow = mesh.supervisor.start(ChildSpec("slow-detector", (
            "serve", "detector", "--inject-delay-ms", "300", "--max-batch-size", "1", "--port", "0",
            "--port-file", str(port_file), "--metrics-port", str(slow_metrics), "--check-interval", "1"),
            port_file=port_file))  # fmt: skip
        mesh.supervisor.wait_port(slow, 120)
        wait_until(lambda: metric(config.gateway_metrics_port, "meshserve_gateway_replicas", 'stage="detector"') == 2,
                   timeout=30)  # fmt: skip
        fast = next(c for c in mesh.supervisor.children if c.spec.name == "detector-0")
        fast.proc.send_signal(signal.SIGTERM)  # deregisters itself, then drains
        wait_until(lambda: metric(config.gateway_metrics_port, "meshserve_gateway_replicas", 'stage="detector"') == 1,
                   timeout=30)  # fmt: skip
        yield mesh, slow_metrics
    finally:
        mesh.stop()


def test_a_slow_detector_past_the_deadline_gives_deadline_exceeded_and_drops_expired_work(
    slow_mesh: tuple[LocalMesh, int],
) -> None:
    mesh, detector_metrics = slow_mesh
    image = held_out_photos(mesh.config.home, 1)[0].jpeg
    gateway_metrics = mesh.config.gateway_metrics_port
    assert gateway_metrics is not None

    with grpc.insecure_channel(mesh.config.gateway_addr) as channel:
        stub = photo_search_pb2_grpc.PhotoSearchStub(channel)
        request = photo_search_pb2.SearchRequest(image=image, min_detection_score=0.01, no_cache=True)
        stub.Search(request, timeout=10)  # connected and warm; the slow detector answers in ~300 ms

        elapsed: list[float] = []
        codes: list[grpc.StatusCode] = []

        def call() -> None:
            started = time.monotonic()
            try:
                stub.Search(request, timeout=0.05)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
            elapsed.append(time.monotonic() - started)

        dropped_before = metric(detector_metrics, "meshserve_server_dropped_expired_total")
        seen = "meshserve_server_deadline_remaining_seconds"
        within_before, _ = histogram(detector_metrics, seen, "0.05")
        ended_before = gateway_ended_at_deadline(gateway_metrics)
        callers = [threading.Thread(target=call) for _ in range(4)]
        for t in callers:
            t.start()
        for t in callers:
            t.join(timeout=10)

    assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * 4
    print(f"\n50 ms deadline vs a 300 ms detector: caller saw DEADLINE_EXCEEDED after "
          f"{', '.join(f'{1000 * e:.0f}' for e in sorted(elapsed))} ms")
    assert max(elapsed) < 1.0  # 50 ms asked: generous for a busy 2-core machine, short of 4 × 300 ms
    # the deadline reached the detector: the calls that got there arrived with at most the caller's 50 ms
    # left (a call without the caller's deadline would land above that bucket, or carry none at all). On a
    # starved machine some of the 4 expire inside the gateway before they are sent, rightly never reaching
    # the detector, and other calls may land in the window, so count the short arrivals: at least one.
    wait_until(lambda: histogram(detector_metrics, seen, "0.05")[0] >= within_before + 1, timeout=30,
               what="a call arriving at the detector with at most 50 ms left")  # fmt: skip
    # the gateway ended each call at the deadline too (it did not wait for the detector) …
    wait_until(lambda: gateway_ended_at_deadline(gateway_metrics) >= ended_before + 4, timeout=30)
    # … and the detector never computed the calls that expired while queued behind the slow one
    wait_until(lambda: metric(detector_metrics, "meshserve_server_dropped_expired_total") >= dropped_before + 3,
               timeout=30)  # fmt: skip
