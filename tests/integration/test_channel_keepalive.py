"""A mesh channel notices a peer that went silent with its connection open (the server process
stopped with SIGSTOP) through its keepalive pings, within seconds, long before the call's deadline;
and the mesh's servers accept those pings on an idle connection instead of sending it away."""

from __future__ import annotations

import os
import signal
import time
from concurrent import futures

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2_grpc

from meshserve.rpc.channel_options import KEEPALIVE_TIME_MS, KEEPALIVE_TIMEOUT_MS, client_options
from tests.integration.identity_server import predict_request, start_identity, stub
from tests.support import free_port, wait_until

LONG_DEADLINE_S = 90.0  # far beyond the keepalive bound: only the pings can end the call sooner


def test_a_stopped_server_is_noticed_by_keepalive_and_the_channel_recovers(spawn) -> None:
    server = start_identity(spawn)
    request = predict_request(np.ones((1, 4), np.float32))
    with grpc.insecure_channel(server.target, options=client_options()) as channel:
        predict = stub(channel).Predict
        predict(request, timeout=10)
        os.kill(server.proc.pid, signal.SIGSTOP)
        started = time.monotonic()
        try:
            try:
                predict(request, timeout=LONG_DEADLINE_S)
            except grpc.RpcError as exc:
                code = exc.code()
            else:
                code = grpc.StatusCode.OK
            noticed = time.monotonic() - started
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        bound = (KEEPALIVE_TIME_MS + KEEPALIVE_TIMEOUT_MS) / 1000
        assert code == grpc.StatusCode.UNAVAILABLE, code
        assert noticed <= bound + 10, f"noticed after {noticed:.1f}s, keepalive bound {bound:.0f}s"
        assert predict(request, timeout=20, wait_for_ready=True).outputs  # reconnects once it answers
    print(f"\nsilent server noticed by keepalive after {noticed:.1f}s (bound {bound:.0f}s, deadline "
          f"{LONG_DEADLINE_S:.0f}s)")


def test_an_idle_mesh_connection_keeps_pinging_without_being_sent_away(spawn) -> None:
    """The clients ping every KEEPALIVE_TIME_MS even with no call running; a server that does not
    accept that answers with GOAWAY "too_many_pings" after a few pings, which drops the connection
    the pings were meant to keep. The mesh's server must keep the idle connection READY, while a gRPC
    server with default options, pinged the same way, sends it away (so the watch below can see it)."""
    mesh_server = start_identity(spawn)
    default_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), default_server)
    default_port = free_port()
    default_server.add_insecure_port(f"127.0.0.1:{default_port}")
    default_server.start()
    states: dict[str, list[grpc.ChannelConnectivity]] = {"mesh": [], "default": []}
    channels = {"mesh": grpc.insecure_channel(mesh_server.target, options=client_options()),
                "default": grpc.insecure_channel(f"127.0.0.1:{default_port}", options=client_options())}  # fmt: skip
    try:
        for name, channel in channels.items():
            channel.subscribe(states[name].append, try_to_connect=True)
            grpc.channel_ready_future(channel).result(timeout=20)

        def sent_away(name: str) -> bool:
            seen = states[name]
            return grpc.ChannelConnectivity.READY in seen and seen[-1] != grpc.ChannelConnectivity.READY

        started = time.monotonic()
        wait_until(lambda: sent_away("default"), timeout=9 * KEEPALIVE_TIME_MS / 1000,
                   what=f"the default server's GOAWAY for too many pings (states {states['default']})")
        idle_s = time.monotonic() - started
        assert not sent_away("mesh"), f"the mesh server dropped an idle connection: {states['mesh']}"
        assert states["mesh"][-1] == grpc.ChannelConnectivity.READY
    finally:
        for channel in channels.values():
            channel.close()
        default_server.stop(grace=None)
    print(f"\nidle {idle_s:.0f}s with pings every {KEEPALIVE_TIME_MS / 1000:.0f}s: the mesh server kept the "
          f"connection READY, a default server sent it away")
