"""A mesh channel notices a peer that went silent with its connection open (the server process
stopped with SIGSTOP) through its keepalive pings, within seconds, long before the call's deadline."""

from __future__ import annotations

import os
import signal
import time

import grpc
import numpy as np

from meshserve.rpc.channel_options import KEEPALIVE_TIME_MS, KEEPALIVE_TIMEOUT_MS, client_options
from tests.integration.identity_server import predict_request, start_identity, stub

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
