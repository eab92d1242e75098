"""The whole mesh on one machine: registry, models, shards and gateway as supervised children."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from meshserve.local.mesh_pki import MeshPki
from meshserve.local.supervisor import PARENT_ENV, Child, ChildSpec, Supervisor
from meshserve.pki.layout import CLIENT_CERT_NAME
from meshserve.queue.config import WORKER_SERVICE
from meshserve.registry.config import SERVICE_NAMES, RegistryConfig
from meshserve.rpc.tls_files import TlsFiles

log = logging.getLogger(__name__)

Say = Callable[[str], None]
RENEWAL_CHECK_S = 60.0  # certificates live 24 h and are renewed after 16: checking each minute is plenty


@dataclass(frozen=True)
class MeshConfig:
    home: Path
    consul: str | None = None  # None: start the dev agent on registry_addr
    registry_addr: str = "127.0.0.1:8500"
    gateway_addr: str = "127.0.0.1:50050"
    detectors: int = 2
    embedders: int = 2
    shards: int = 4
    indexer_processes: int = 0  # the shards dealt over this many indexer processes (0: one per shard)
    threads: int = 1
    check_interval_s: float = 1.0
    ready_timeout_s: float = 180.0
    trace_file: Path | None = None
    gateway_metrics_port: int | None = None
    gateway_args: tuple[str, ...] = ()  # extra `meshserve gateway` flags
    prometheus_addr: str | None = None  # start Prometheus there (or on a free port), see prometheus.py
    nats_addr: str | None = None  # start `meshserve nats dev` here (None: the job queue is someone else's)
    workers: int = 0  # `meshserve worker` processes for the job queue
    acl: bool = False  # the dev registry with ACLs on and a token per workload (`up` and `demo`; --insecure: off)
    secure: bool = False  # mTLS between every process, certificates under $MESHSERVE_HOME/pki (`up` and `demo`)

    def __post_init__(self) -> None:
        if self.detectors < 1 or self.embedders < 1 or self.shards < 1:
            raise ValueError("need at least one detector, one embedder and one shard")
        if self.indexer_processes < 0:
            raise ValueError("--indexer-processes must be ≥ 0 (0: one per shard)")
        host, _, port = self.gateway_addr.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--gateway-addr {self.gateway_addr!r} is not HOST:PORT")

    @property
    def run_dir(self) -> Path:
        return self.home / "up"


@dataclass
class Endpoint:
    role: str
    name: str
    target: str
    child: Child


@dataclass
class MeshInfo:
    registry: str
    gateway: str
    endpoints: list[Endpoint] = field(default_factory=list)
    trace_file: Path | None = None
    versions: dict[str, str] = field(default_factory=dict)
    registry_child: Child | None = None  # None when the mesh uses an outside Consul
    prometheus: str | None = None  # its URL, when started
    pki: Path | None = None  # the mesh CA's directory when the processes speak mTLS

    def table(self) -> str:
        registry_pid = f"   pid {self.registry_child.proc.pid}" if self.registry_child else ""
        lines = [f"registry   {self.registry}{registry_pid}",
                 f"gateway    {self.gateway}   (meshserve search IMAGE --gateway {self.gateway})"]
        for e in self.endpoints:
            lines.append(f"{e.role:<10} {e.target:<22} {e.name:<18} pid {e.child.proc.pid:<7} log {e.child.log_path}")
        if self.trace_file:
            lines.append(f"traces     {self.trace_file}   (meshserve trace TRACE_ID)")
        if self.prometheus:
            lines.append(f"prometheus {self.prometheus}   (meshserve top: the same live, in this terminal)")
        lines.append(f"mtls       {self.pki}   (meshserve certs show)" if self.pki else "mtls       off (--insecure)")
        return "\n".join(lines)


def indexer_groups(shard_dirs: list[Path], processes: int) -> list[list[Path]]:
    """The shards of each indexer process: dealt in order over `processes` (0: one process per shard)."""
    count = len(shard_dirs) if processes <= 0 else min(processes, len(shard_dirs))
    bounds = [len(shard_dirs) * i // count for i in range(count + 1)]
    return [shard_dirs[bounds[i]:bounds[i + 1]] for i in range(count)]


def _leader_answers(registry: RegistryConfig) -> bool:
    try:
        with urllib.request.urlopen(f"{registry.http_addr}/v1/status/leader", timeout=1,
                                    context=registry.ssl_context()) as resp:  # fmt: skip
            return resp.status == 200
    except OSError:
        return False


class LocalMesh:
    def __init__(self, config: MeshConfig, say: Say = print):
        self.config = config
        self.say = say
        config.run_dir.mkdir(parents=True, exist_ok=True)
        self.trace_file = config.trace_file or config.run_dir / "traces.jsonl"
        registry_host = config.registry_addr.rpartition(":")[0].strip("[]")
        self.pki = MeshPki.prepare(config.home, config.secure, registry_host=registry_host)
        # Secure, the dev registry speaks only HTTPS and wants a client certificate of the mesh CA.
        self._registry_pki = self.pki if config.consul is None else None
        scheme = "https" if self._registry_pki is not None else "http"
        self.registry_addr = config.consul or f"{scheme}://{config.registry_addr}"
        env = {"MESHSERVE_HOME": str(config.home), "CONSUL_HTTP_ADDR": self.registry_addr,
               "MESHSERVE_TRACE_FILE": str(self.trace_file),
               **dict(self._registry_tls_env(CLIENT_CERT_NAME))}  # fmt: skip
        self.supervisor = Supervisor(config.run_dir / "logs", env)
        self._ports = config.run_dir / "ports"
        self._ports.mkdir(exist_ok=True)
        self._tokens: dict[str, Path] = {}  # workload → its registry token file, when ACLs are on
        self._renewal_checked = time.monotonic()

    # -- bring up -------------------------------------------------------------------------------

    def start(self) -> MeshInfo:
        cfg = self.config
        if cfg.prometheus_addr is not None:  # say so before minutes of bring-up, not after
            from meshserve.local.prometheus import require_binary

            require_binary()
        self.trace_file.unlink(missing_ok=True)
        registry_child = None
        if cfg.consul is None:
            registry_child = self._start_registry()
            self._provision_acl()
        elif not _leader_answers(self._registry_config()):
            raise RuntimeError(f"Consul at {self.registry_addr} does not answer /v1/status/leader")
        self._train_if_missing()
        shard_dirs = self._build_shards()

        info = MeshInfo(self.registry_addr, cfg.gateway_addr, trace_file=self.trace_file,
                        registry_child=registry_child, pki=self.pki.layout.root if self.pki else None)
        nats = self._start_nats(cfg.nats_addr) if cfg.nats_addr is not None else None
        # The gateway first: it binds its fixed port before any model server takes a free one
        # (one of those could otherwise be handed the same port), and it discovers the rest.
        host, _, gateway_port = cfg.gateway_addr.rpartition(":")
        gateway_port_file = self._ports / "gateway.port"
        gateway_args = ["gateway", "--host", host, "--port", gateway_port, "--port-file", str(gateway_port_file),
                        "--check-interval", str(cfg.check_interval_s), *cfg.gateway_args]
        # Every server serves /metrics (registered as meta metrics_port): Prometheus and `top` find it.
        gateway_args += ["--metrics-port", str(cfg.gateway_metrics_port or 0)]
        gateway = self.supervisor.start(ChildSpec("gateway", tuple(gateway_args), self._env("gateway"),
                                                  port_file=gateway_port_file))  # fmt: skip
        self.supervisor.wait_port(gateway, cfg.ready_timeout_s)
        gateway_endpoint = Endpoint("gateway", "gateway", cfg.gateway_addr, gateway)

        plan: list[tuple[str, str, list[str]]] = []
        plan += [("detector", f"detector-{i}", ["serve", "detector"]) for i in range(cfg.detectors)]
        plan += [("embedder", f"embedder-{i}", ["serve", "embedder"]) for i in range(cfg.embedders)]
        plan += [("classifier", f"classifier-{name}", ["serve", "classifier", "--model", name])
                 for name in self._classifier_names()]  # fmt: skip
        plan += [("shipping", "shipping", ["serve", "shipping"])]
        for group in indexer_groups(shard_dirs, cfg.indexer_processes):
            shard_args = [arg for d in group for arg in ("--shard", str(d))]
            plan += [("indexer", "indexer-" + "+".join(d.name for d in group), ["serve", "indexer", *shard_args])]
        self.say(f"starting {len(plan)} model servers …")
        for role, name, args in plan:
            port_file = self._ports / f"{name}.port"
            spec = ChildSpec(name, (*args, "--port", "0", "--port-file", str(port_file), "--threads",
                                    str(cfg.threads), "--check-interval", str(cfg.check_interval_s),
                                    "--metrics-port", "0"),
                             self._env(role), port_file=port_file)  # fmt: skip
            info.endpoints.append(Endpoint(role, name, "", self.supervisor.start(spec)))
        for endpoint in info.endpoints:
            port = self.supervisor.wait_port(endpoint.child, cfg.ready_timeout_s)
            endpoint.target = f"127.0.0.1:{port}"
        self._wait_passing(info.endpoints)

        self._wait_passing([gateway_endpoint])
        info.endpoints.append(gateway_endpoint)
        if cfg.prometheus_addr is not None:
            from meshserve.local.prometheus import start_prometheus

            info.prometheus = start_prometheus(self.supervisor, cfg.run_dir / "prometheus", self.registry_addr,
                                               cfg.prometheus_addr, tls=self._client_tls())  # fmt: skip
        if nats is not None:
            info.endpoints.append(nats)
        for i in range(cfg.workers):
            port_file = self._ports / f"worker-{i}.port"
            worker = self.supervisor.start(ChildSpec(f"worker-{i}", ("worker", "--port-file", str(port_file),
                                                                   "--check-interval", str(cfg.check_interval_s),
                                                                   "--metrics-port", "0"),
                                                     self._env("worker"), port_file=port_file))  # fmt: skip
            port = self.supervisor.wait_port(worker, cfg.ready_timeout_s)
            info.endpoints.append(Endpoint("worker", f"worker-{i}", f"127.0.0.1:{port}", worker))
        return info

    def _start_nats(self, addr: str) -> Endpoint:
        """`meshserve nats dev` (JetStream stored under $MESHSERVE_HOME/nats), listening before anyone looks."""
        import socket

        host, _, port = addr.rpartition(":")
        with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=1):
            raise RuntimeError(f"something already listens on {addr}; stop it, or pass another --nats-addr")
        child = self.supervisor.start(ChildSpec("nats", ("nats", "dev", "--host", host, "--port", port),
                                                env=self._token_env("nats")))
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection((host, int(port)), timeout=1).close()
                break
            except OSError:
                if not child.alive or time.monotonic() > deadline:
                    raise RuntimeError(f"NATS did not come up: {self.supervisor.tail(child)}") from None
                time.sleep(0.05)
        self.say(f"NATS JetStream on nats://{addr}")
        return Endpoint("nats", "nats", addr, child)

    def _start_registry(self) -> Child:
        if _leader_answers(self._registry_config()):
            raise RuntimeError(f"something already answers as Consul on {self.registry_addr}; "
                               "stop it, or pass --consul to use it")  # fmt: skip
        # A fresh registry per `up`, persisted so that a restart of it (crash, drill) keeps
        # every registration, as a real Consul agent keeps its local services.
        data_dir = self.config.run_dir / "registry"
        shutil.rmtree(data_dir, ignore_errors=True)
        acl = ("--acl-enabled",) if self.config.acl else ()
        listen: tuple[str, ...] = ("--http-addr", self.config.registry_addr)
        if self._registry_pki is not None:
            listen = self._registry_pki.https_registry_args(self.config.registry_addr)
        spec = ChildSpec("registry", ("registry", "dev", *listen, "--data-dir", str(data_dir), *acl))
        child = self.supervisor.start(spec)
        deadline = time.monotonic() + 30
        while not _leader_answers(self._registry_config()):
            if not child.alive or time.monotonic() > deadline:
                raise RuntimeError(f"the dev registry did not come up: {self.supervisor.tail(child)}")
            time.sleep(0.05)
        self.say(f"dev registry on {self.registry_addr}")
        return child

    def _provision_acl(self) -> None:
        """Bootstrap the fresh registry's ACLs: a policy and a token per workload under $MESHSERVE_HOME/acl."""
        from meshserve.local import acl_setup

        if not self.config.acl:
            acl_setup.forget(self.config.home)
            return
        self._tokens = acl_setup.provision(self._registry_config(), self.config.home)
        # Anything started without a workload of its own (Prometheus discovery) reads with the reader token.
        self.supervisor.base_env.update(self._token_env("reader"))
        self.say(f"registry ACLs on: default deny, tokens in {acl_setup.acl_dir(self.config.home)}")

    def _token_env(self, workload: str) -> tuple[tuple[str, str], ...]:
        path = self._tokens.get(workload)
        if path is None:
            return ()
        return (("CONSUL_HTTP_TOKEN", ""), ("CONSUL_HTTP_TOKEN_FILE", str(path)))

    def _registry_config(self) -> RegistryConfig:
        """How the mesh itself reads the registry (with the operator token when ACLs are on, over HTTPS with the
        command-line certificate when secure)."""
        operator = self._tokens.get("operator")
        token = operator.read_text().strip() if operator else None
        config = RegistryConfig.from_env(http_addr=self.registry_addr, token=token)
        if self._registry_pki is None:
            return config
        tls = dict(self._registry_tls_env(CLIENT_CERT_NAME))
        return dataclasses.replace(config, http_addr=self.registry_addr, ca_file=tls["CONSUL_CACERT"],
                                   cert_file=tls["CONSUL_CLIENT_CERT"], key_file=tls["CONSUL_CLIENT_KEY"])

    def _train_if_missing(self) -> None:
        from meshserve.inference.artifacts import latest
        from meshserve.inference.detector import outdated

        newest = {k: latest(k, self.config.home) for k in ("detector", "embedder", "classifier", "shipping")}
        missing = [k for k, path in newest.items() if path is None]
        if missing:
            self.say(f"no trained {', '.join(missing)} yet")
        detector = newest["detector"]
        if detector is not None and (reason := outdated(detector)):
            self.say(f"the newest detector ({detector.name}) is of an older kind: {reason}")
            missing.insert(0, "detector")
        if not missing:
            return
        self.say("running `meshserve train --quick` (about 3 minutes) …")
        import subprocess

        kinds = ",".join(missing)
        # Same process group (a terminal's Ctrl-C reaches it), but it dies with us if we are killed
        # (child.py sets that up; see Supervisor.start for why not in a preexec_fn).
        done = subprocess.run([sys.executable, "-m", "meshserve.local.child", "train", "--quick", "--only", kinds],
                              env={**os.environ, "MESHSERVE_HOME": str(self.config.home),
                                   PARENT_ENV: str(os.getpid())})  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"training failed (exit {done.returncode})")

    def _build_shards(self) -> list[Path]:
        """The newest embedder's shard set over the catalogue, built once and reused."""
        from meshserve.inference.artifacts import latest
        from meshserve.inference.shards import ShardError, read_manifest
        from meshserve.training.catalogue import load_items
        from meshserve.training.shard_build import ItemSlice, build_from_catalogue

        embedder_dir = latest("embedder", self.config.home)
        assert embedder_dir is not None
        ids = [item.item_id for item in load_items(self.config.home)]
        parts = self.config.shards
        bounds = [ids[0] + (len(ids) * i) // parts for i in range(parts)] + [ids[-1] + 1]
        root = self.config.run_dir / "shards" / embedder_dir.name
        dirs = []
        for i in range(parts):
            shard_dir = root / f"base-{i}"
            lo, hi = bounds[i], bounds[i + 1]
            try:
                manifest = read_manifest(shard_dir)
                fresh = manifest.items == ItemSlice("ids", lo, hi).describe()
            except ShardError:
                fresh = False
            if not fresh:
                self.say(f"building shard base-{i} (items {lo}–{hi - 1}) …")
                build_from_catalogue(shard_dir, ItemSlice("ids", lo, hi), embedder=str(embedder_dir),
                                     shard=f"base-{i}", home=self.config.home)  # fmt: skip
            dirs.append(shard_dir)
        return dirs

    def _classifier_names(self) -> list[str]:
        from meshserve.inference.artifacts import latest

        newest = latest("classifier", self.config.home)
        if newest is None:
            return []
        return sorted(p.name for p in newest.iterdir() if p.is_dir() and (p / "card.json").is_file())

    def _wait_passing(self, endpoints: list[Endpoint]) -> None:
        from meshserve.registry.client import RegistryClient

        role_service = {**SERVICE_NAMES}
        wanted = {(role_service[e.role], e.target) for e in endpoints}
        registry = self._registry_config()

        async def passing() -> set[tuple[str, str]]:
            found = set()
            async with RegistryClient(registry) as client:
                for service in {s for s, _ in wanted}:
                    for instance in await client.passing(service):
                        found.add((service, instance.target))
            return found

        deadline = time.monotonic() + self.config.ready_timeout_s
        while True:
            missing = wanted - asyncio.run(passing())
            if not missing:
                return
            for e in endpoints:
                if not e.child.alive:
                    tail = self.supervisor.tail(e.child)
                    raise RuntimeError(f"{e.name} exited with {e.child.proc.returncode}: {tail}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"not passing after {self.config.ready_timeout_s:.0f}s: {sorted(missing)}")
            time.sleep(0.2)

    # -- run and stop ---------------------------------------------------------------------------

    def _env(self, role: str) -> tuple[tuple[str, str], ...]:
        """A child's credentials: its certificate (mTLS, and as the HTTPS registry's client) and its registry
        token (ACLs)."""
        service = WORKER_SERVICE if role == "worker" else SERVICE_NAMES[role]
        return self._tls_env(service) + self._registry_tls_env(service) + self._token_env(role)

    def _tls_env(self, service: str) -> tuple[tuple[str, str], ...]:
        return self.pki.env(service) if self.pki is not None else ()

    def _client_tls(self) -> TlsFiles | None:
        """The command-line certificate, for what reads the processes' mTLS ports (Prometheus)."""
        return TlsFiles.from_pki(self.pki.layout, CLIENT_CERT_NAME) if self.pki is not None else None

    def _registry_tls_env(self, name: str) -> tuple[tuple[str, str], ...]:
        """CONSUL_CACERT and CONSUL_CLIENT_CERT/KEY (certificate `name`) for the local HTTPS registry."""
        return self._registry_pki.registry_env(name) if self._registry_pki is not None else ()

    def watch(self, stop_requested: Callable[[], bool]) -> None:
        while not stop_requested():
            for event in self.supervisor.check():
                self.say(event)
            if self.pki is not None and time.monotonic() - self._renewal_checked > RENEWAL_CHECK_S:
                self._renewal_checked = time.monotonic()
                if renewed := self.pki.renew_due():
                    self.say(f"renewed certificates: {', '.join(renewed)}")
            time.sleep(0.25)

    def stop(self) -> None:
        # The gateway first (no new searches), then the model servers, the registry last so
        # everyone can deregister.
        with _signals_ignored():
            self.supervisor.stop_all(grace=15.0, first=("gateway",), last=("nats", "registry"))


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    """SIGINT and SIGTERM do nothing while the mesh stops: a second Ctrl-C asks for what is already
    happening, and raised in the middle of stop_all() it would leave children half-stopped."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers; signals are delivered there anyway
        return
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
