"""ACLs for a local mesh: bootstrap the dev registry, a policy and token per workload in $MESHSERVE_HOME/acl."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

from meshserve.registry.acl_cli import create_policy, write_secret
from meshserve.registry.acl_policies import workload_policies
from meshserve.registry.config import LOCAL_REGISTRY_ADDR, RegistryConfig

ACL_DIR = "acl"
BOOTSTRAP_FILE = "bootstrap.token"


def acl_dir(home: Path) -> Path:
    return home / ACL_DIR


def token_file(home: Path, workload: str) -> Path:
    """`$MESHSERVE_HOME/acl/<workload>.token`, e.g. detector.token, gateway.token, operator.token."""
    return acl_dir(home) / f"{workload}.token"


def forget(home: Path) -> None:
    """No tokens of an earlier mesh left behind for clients to pick up."""
    shutil.rmtree(acl_dir(home), ignore_errors=True)


def provision(registry: RegistryConfig, home: Path) -> dict[str, Path]:
    """Bootstrap a fresh dev registry's ACLs, create every workload's policy and token; workload → token file."""
    forget(home)
    directory = acl_dir(home)
    directory.mkdir(parents=True, mode=0o700)
    os.chmod(directory, 0o700)
    # No token: the bootstrap needs none, and the management token it makes is used after it.
    return asyncio.run(_provision(dataclasses.replace(registry, token=None), home))


async def _provision(config: RegistryConfig, home: Path) -> dict[str, Path]:
    from meshserve.registry.consul_http import open_consul, translate_errors

    files: dict[str, Path] = {}
    client: Any = open_consul(config)
    try:
        with translate_errors("ACL bootstrap of the dev registry", config):
            boot = await client.acl.bootstrap()
            write_secret(acl_dir(home) / BOOTSTRAP_FILE, boot["SecretID"])
            client.token = boot["SecretID"]
            for name, rules in workload_policies().items():
                await create_policy(client, name, rules, f"meshserve up: {name}")
                token = await client.acl.token.create(policies_name=[name], description=f"meshserve up: {name}")
                workload = name.removeprefix("meshserve-")
                files[workload] = token_file(home, workload)
                write_secret(files[workload], token["SecretID"])
    finally:
        await client.close()
    # Commands of this home (status, config, jobs, search …) use the operator token for this registry only.
    (acl_dir(home) / LOCAL_REGISTRY_ADDR.name).write_text(config.http_addr.rstrip("/") + "\n")
    return files
