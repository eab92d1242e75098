"""Publishing shards into the mesh: start indexers detached, wait until Consul passes them; retire them.

A published indexer is an ordinary `meshserve serve indexer` process in its own session, so it
outlives the command that started it. What this machine started is remembered under
MESHSERVE_HOME/run/indexers/ (pid, port, log) so `retire` can stop it gracefully: SIGTERM makes the
server turn NOT_SERVING, deregister and drain, as every meshserve server does.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from meshserve.inference.artifacts import meshserve_home
from meshserve.inference.shards import ShardManifest, read_manifest
from meshserve.registry.client import RegistryClient
from meshserve.registry.config import SERVICE_NAMES, RegistryConfig
from meshserve.registry.instances import Instance, instance_from_entry
from meshserve.registry.retired_shards import mark_retired, unmark_retired

INDEXER_SERVICE = SERVICE_NAMES["indexer"]


@dataclass(frozen=True)
class PublishConfig:
    registry: RegistryConfig
    replicas: int = 1
    host: str = "127.0.0.1"
    check_interval_s: float = 1.0
    deregister_after_s: float = 60.0
    ready_timeout_s: float = 120.0
    threads: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.replicas <= 16:
            raise ValueError(f"--replicas must be between 1 and 16, got {self.replicas}")


@dataclass(frozen=True)
class RunRecord:
    """An indexer this machine started: enough to find it again and stop it."""

    pid: int
    port: int
    instance_id: str
    shard: str
    shard_dir: str
    log: str


@dataclass(frozen=True)
class Replica:
    """One registered indexer and the aggregate of its checks."""

    instance: Instance
    status: str  # passing | warning | critical


def run_dir(home: Path | None = None) -> Path:
    path = (home or meshserve_home()) / "run" / "indexers"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wait_for_port_file(path: Path, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"indexer exited with {proc.returncode} before listening:\n{tail}")
        text = path.read_text().strip() if path.exists() else ""
        if text:
            return int(text)
        time.sleep(0.05)
    raise TimeoutError(f"indexer did not start listening within {timeout:.0f}s (log: {log})")


def start_indexer(shard_dir: Path, config: PublishConfig, home: Path | None = None) -> RunRecord:
    """Start one indexer in its own session; return once it listens (not yet once it passes)."""
    manifest = read_manifest(shard_dir)
    runs = run_dir(home)
    stamp = f"{manifest.shard}-{time.time_ns()}"
    port_file, log = runs / f"{stamp}.port", runs / f"{stamp}.log"
    argv = [
        sys.executable, "-m", "meshserve", "serve", "indexer", "--shard", str(shard_dir.resolve()),
        "--host", config.host, "--port", "0", "--port-file", str(port_file),
        "--consul", config.registry.http_addr, "--check-interval", str(config.check_interval_s),
        "--deregister-after", str(config.deregister_after_s), "--threads", str(config.threads),
    ]  # fmt: skip
    with open(log, "ab") as log_fh:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_fh, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    try:
        port = _wait_for_port_file(port_file, proc, log, timeout=config.ready_timeout_s)
    except BaseException:
        proc.kill()
        raise
    finally:
        port_file.unlink(missing_ok=True)
    record = RunRecord(pid=proc.pid, port=port, instance_id=f"{INDEXER_SERVICE}-{config.host}-{port}",
                       shard=manifest.shard, shard_dir=str(shard_dir.resolve()), log=str(log))
    (runs / f"{record.instance_id}.json").write_text(json.dumps(asdict(record)))
    return record


def aggregate_status(checks: list[Mapping[str, Any]]) -> str:
    """Consul's rule for an instance: critical if any check is, else warning if any is."""
    statuses = {str(c.get("Status", "critical")) for c in checks}
    for status in ("critical", "warning"):
        if status in statuses:
            return status
    return "passing"


async def registered_indexers(config: RegistryConfig) -> list[Replica]:
    """Every registered indexer, passing or not, with its health."""
    async with RegistryClient(config) as client:
        _, entries = await client.call(f"read {INDEXER_SERVICE}", client.consul.health.service(INDEXER_SERVICE))
    return [Replica(instance_from_entry(e), aggregate_status(e.get("Checks") or [])) for e in entries]


async def wait_passing(config: RegistryConfig, ports: set[int], host: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        async with RegistryClient(config) as client:
            passing = {(i.address, i.port) for i in await client.passing(INDEXER_SERVICE)}
        if {(host, p) for p in ports} <= passing:
            return
        if time.monotonic() > deadline:
            missing = sorted(p for p in ports if (host, p) not in passing)
            raise TimeoutError(f"indexers on ports {missing} did not pass their check in {timeout:.0f}s")
        await asyncio.sleep(0.1)


def publish(
    shard_dir: Path, config: PublishConfig, home: Path | None = None
) -> tuple[ShardManifest, list[RunRecord]]:
    """Start `config.replicas` indexers for the shard and wait until Consul passes all of them."""
    manifest = read_manifest(shard_dir)
    asyncio.run(_unretire(config.registry, manifest.shard))
    records: list[RunRecord] = []
    try:
        for _ in range(config.replicas):
            records.append(start_indexer(shard_dir, config, home))
        asyncio.run(wait_passing(config.registry, {r.port for r in records}, config.host,
                                 config.ready_timeout_s))  # fmt: skip
    except BaseException:
        for record in records:
            stop_process(record.pid, grace_s=5.0)
        raise
    return manifest, records


def stop_process(pid: int, grace_s: float) -> bool:
    """SIGTERM (the server deregisters and drains), SIGKILL after `grace_s`. True if it was running."""
    if not _pid_alive(pid):
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            return True
        time.sleep(0.05)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return True


def _reap_zombie(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


async def _unretire(config: RegistryConfig, shard: str) -> None:
    async with RegistryClient(config) as client:
        await unmark_retired(client, shard)


def retire(shard: str, config: RegistryConfig, home: Path | None = None, grace_s: float = 15.0) -> list[str]:
    """Take `shard` out of the registry at once, then stop the indexers of it this machine started.
    The shard is marked retired in KV, so a server that also serves other shards keeps it out.

    Deregistering first means no new query is routed to the shard while its servers drain.
    Returns the instance ids retired; an unknown shard gives an empty list.
    """
    replicas = [r for r in asyncio.run(registered_indexers(config)) if r.instance.meta.get("shard") == shard]

    async def deregister_all() -> None:
        async with RegistryClient(config) as client:
            if replicas:  # first: a server that serves other shards too must not register this one again
                await mark_retired(client, shard, [r.instance.id for r in replicas])
            for replica in replicas:
                await client.deregister(replica.instance.id)

    asyncio.run(deregister_all())
    retired = [r.instance.id for r in replicas]
    for path in sorted(run_dir(home).glob("*.json")):
        record = RunRecord(**json.loads(path.read_text()))
        if record.shard != shard:
            continue
        stop_process(record.pid, grace_s)
        _reap_zombie(record.pid)
        path.unlink(missing_ok=True)
        if record.instance_id not in retired:
            retired.append(record.instance_id)
    return retired
