"""`meshserve nats dev` as a real process: nats-server with JetStream stored under $MESHSERVE_HOME/nats,
registered as meshserve-nats with a TCP check while it runs, gone from the registry and the port
after SIGTERM; a worker finds it through the registry."""

from __future__ import annotations

import json
import socket
import urllib.request
from collections.abc import Callable
from pathlib import Path

from tests.support import DevAgent, ManagedProcess, free_port, meshserve_argv, wait_until


def passing_nats(agent: DevAgent) -> list[dict]:
    with urllib.request.urlopen(f"{agent.http_addr}/v1/health/service/meshserve-nats?passing", timeout=5) as resp:
        return json.loads(resp.read())


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def test_nats_dev_registers_stores_under_home_and_leaves_on_sigterm(
    spawn: Callable[..., ManagedProcess], dev_agent: DevAgent, tmp_path: Path
) -> None:
    port = free_port()
    env = {"MESHSERVE_HOME": str(tmp_path / "home"), "CONSUL_HTTP_ADDR": dev_agent.http_addr}
    nats = spawn(meshserve_argv("nats", "dev", "--port", str(port)), name="nats", env=env)
    entries = wait_until(lambda: nats.check_alive() or passing_nats(dev_agent), timeout=30,
                         what="meshserve-nats passing")  # fmt: skip
    service = entries[0]["Service"]
    assert (service["Address"], service["Port"]) == ("127.0.0.1", port)
    assert any(c["Name"].startswith("TCP of") and c["Status"] == "passing" for c in entries[0]["Checks"])
    assert (tmp_path / "home" / "nats" / "nats-server.conf").is_file()

    # a worker finds it through the registry (no NATS_URL) and creates the queue's stream there
    worker = spawn(meshserve_argv("worker", "--port", str(free_port()), "--no-register"), name="worker", env=env)
    wait_until(lambda: worker.check_alive() or "taking jobs from nats://127.0.0.1:" + str(port) in worker.output(),
               timeout=60, what="the worker connected")  # fmt: skip
    assert worker.stop() == 0
    wait_until(lambda: (tmp_path / "home" / "nats" / "jetstream").is_dir(), timeout=10, what="JetStream's files")

    assert nats.stop(grace=20) == 0
    assert not accepts(port)  # nats-server went with it
    assert passing_nats(dev_agent) == []
