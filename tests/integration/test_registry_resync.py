"""A server stays registered: when its agent loses it (a dev agent restarted without a data dir),
it registers again by itself within its resync interval."""

from __future__ import annotations

from collections.abc import Callable

import consul

from tests.conftest import DevAgent
from tests.integration.identity_server import start_identity
from tests.support import ManagedProcess, wait_until


def test_server_registers_again_after_its_agent_forgot_it(
    spawn: Callable[..., ManagedProcess], start_dev_agent: Callable[..., DevAgent]
) -> None:
    agent = start_dev_agent()
    start_identity(spawn, "--resync-interval", "0.5", register=True, consul=agent.http_addr)

    def passing() -> list:
        return consul.Consul(host="127.0.0.1", port=agent.port).health.service("meshserve-identity",
                                                                                passing=True)[1]  # fmt: skip

    [before] = wait_until(passing, timeout=20, what="identity passing")
    agent.stop()
    agent.start()  # same port, empty state: the registration is gone
    [after] = wait_until(passing, timeout=10, what="identity registered again")
    assert after["Service"]["ID"] == before["Service"]["ID"]
    assert after["Service"]["Meta"] == before["Service"]["Meta"]
