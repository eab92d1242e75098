"""Real model servers under registry ACLs provisioned as `meshserve up` does: each registers only as itself."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import consul

from meshserve.local.acl_setup import provision
from meshserve.registry.config import RegistryConfig
from tests.conftest import DevAgent
from tests.integration.mesh_parts import MeshParts
from tests.integration.test_dev_agent import FAST_FLAGS
from tests.support import ManagedProcess, wait_until


def test_a_server_registers_only_with_its_own_services_token(
    start_dev_agent: Callable[..., DevAgent], spawn: Callable[..., ManagedProcess],
    home_copy: Callable[[], Path],
) -> None:  # fmt: skip
    agent = start_dev_agent(["--acl-enabled", *FAST_FLAGS])
    home = home_copy()
    tokens = provision(RegistryConfig(http_addr=agent.http_addr), home)
    assert {"detector", "shipping", "gateway", "operator", "reader"} <= set(tokens)
    admin = agent.client(token=(home / "acl" / "bootstrap.token").read_text().strip())
    gateway = agent.client(token=tokens["gateway"].read_text().strip())

    class WithToken(MeshParts):
        token_file: Path

        def _env(self) -> dict[str, str]:
            return {**super()._env(), "CONSUL_HTTP_TOKEN_FILE": str(self.token_file)}

    impostor_parts = WithToken(spawn, agent, home)
    impostor_parts.token_file = tokens["detector"]  # a detector's token on the shipping server
    impostor = impostor_parts.server("shipping")
    refused = re.compile(r"""lacks permission 'service:write' on \\?"meshserve-shipping""")  # (JSON log lines)
    wait_until(lambda: refused.search(impostor.proc.output()) is not None,
               timeout=120, what="the registry to refuse the shipping server the detector's token")
    assert impostor.proc.alive()  # it serves on and keeps asking; nobody routes to it
    assert admin.health.service("meshserve-shipping")[1] == []

    parts = WithToken(spawn, agent, home)
    parts.token_file = tokens["shipping"]
    shipping = parts.server("shipping")

    def passing() -> list[int]:
        shipping.proc.check_alive()
        return [e["Service"]["Port"] for e in gateway.health.service("meshserve-shipping", passing=True)[1]]

    wait_until(lambda: passing() == [shipping.port], timeout=120, what="the shipping server passing")
    anonymous: consul.Consul = agent.client()
    assert anonymous.health.service("meshserve-shipping")[1] == []  # default deny: hidden
