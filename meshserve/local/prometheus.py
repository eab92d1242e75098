"""A real Prometheus over the local mesh: our HTTP service discovery, a generated config, the rules.

`meshserve up --prometheus` starts two supervised children: `meshserve prometheus sd` (targets from
the registry) and `meshserve prometheus run` (writes the config, then becomes the `prometheus`
binary). The config is JSON, which Prometheus reads as the YAML subset it is.
"""

from __future__ import annotations

import json
import shutil
import socket
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshserve.local.supervisor import ChildSpec, Supervisor
from meshserve.queue.config import WORKER_SERVICE
from meshserve.registry.config import SERVICE_NAMES
from meshserve.rpc.tls_files import TlsFiles

REPO_RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "rules"
JOB = "meshserve"
PROMETHEUS_BINARY = "prometheus"


@dataclass(frozen=True)
class PrometheusConfig:
    """How the local Prometheus scrapes: short intervals, so a change shows within seconds."""

    sd_url: str  # our http_sd endpoint, e.g. http://127.0.0.1:9091/targets
    scrape_interval_s: float = 2.0
    refresh_interval_s: float = 2.0
    evaluation_interval_s: float = 5.0
    rules_dir: Path | None = REPO_RULES  # None (or missing): no rules loaded
    tls: TlsFiles | None = None  # the client certificate for targets that serve /metrics over mTLS

    def __post_init__(self) -> None:
        if not self.sd_url.startswith(("http://", "https://")):
            raise ValueError(f"--sd-url {self.sd_url!r} is not an http(s):// URL")
        for name in ("scrape_interval_s", "refresh_interval_s", "evaluation_interval_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")


def _duration(seconds: float) -> str:
    millis = max(1, round(seconds * 1000))
    return f"{millis // 1000}s" if millis % 1000 == 0 else f"{millis}ms"


def render_config(config: PrometheusConfig) -> dict[str, Any]:
    """The prometheus.yml document: one job, discovered through our http_sd endpoint."""
    scrape = _duration(config.scrape_interval_s)
    document: dict[str, Any] = {
        "global": {"scrape_interval": scrape, "scrape_timeout": scrape,
                   "evaluation_interval": _duration(config.evaluation_interval_s)},
        "scrape_configs": [_scrape_job(config, JOB, config.sd_url)] if config.tls is None else
                          [_tls_scrape_job(config, service) for service in MESH_SERVICES],
    }  # fmt: skip
    if config.rules_dir is not None and config.rules_dir.is_dir():
        document["rule_files"] = [str(config.rules_dir.resolve() / "*.yml")]
    return document


MESH_SERVICES = (*SERVICE_NAMES.values(), WORKER_SERVICE)


def _scrape_job(config: PrometheusConfig, name: str, sd_url: str) -> dict[str, Any]:
    return {"job_name": name,
            "http_sd_configs": [{"url": sd_url, "refresh_interval": _duration(config.refresh_interval_s)}]}


def _tls_scrape_job(config: PrometheusConfig, service: str) -> dict[str, Any]:
    """One job per service: a replica's certificate names its service, and a job has one TLS server name.
    Every one is labelled job="meshserve" as the single plaintext job is (the rules and dashboards ask for it);
    the targets' `__scheme__` (from the registry meta metrics_scheme) says https."""
    assert config.tls is not None
    sep = "&" if "?" in config.sd_url else "?"
    job = _scrape_job(config, f"{JOB}-{service.removeprefix('meshserve-')}", f"{config.sd_url}{sep}service={service}")
    job["tls_config"] = {"ca_file": str(config.tls.ca), "cert_file": str(config.tls.cert),
                         "key_file": str(config.tls.key), "server_name": service}
    job["relabel_configs"] = [{"target_label": "job", "replacement": JOB}]
    return job  # fmt: skip


def write_config(config: PrometheusConfig, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "prometheus.yml"
    path.write_text(json.dumps(render_config(config), indent=2) + "\n")
    return path


def require_binary() -> str:
    binary = shutil.which(PROMETHEUS_BINARY)
    if binary is None:
        raise RuntimeError("no `prometheus` binary on PATH: install it (Debian: apt-get install prometheus)")
    return binary


def prometheus_argv(config_file: Path, listen: str, data_dir: Path) -> list[str]:
    return [require_binary(), f"--config.file={config_file}", f"--web.listen-address={listen}",
            f"--storage.tsdb.path={data_dir}", "--storage.tsdb.retention.time=1d",
            "--enable-feature=exemplar-storage"]  # fmt: skip


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def parse_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{addr!r} is not HOST:PORT")
    return host, int(port)


def listen_address(wanted: str) -> str:
    """`wanted` HOST:PORT when its port is free, else the same host on any free port."""
    host, port = parse_addr(wanted)
    if _bindable(host, port):
        return wanted
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return f"{host}:{sock.getsockname()[1]}"


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as resp:
            return resp.status == 200
    except OSError:
        return False


def start_prometheus(supervisor: Supervisor, directory: Path, registry_addr: str, wanted_addr: str,
                     timeout_s: float = 60.0, tls: TlsFiles | None = None) -> str:  # fmt: skip
    """Start the service discovery and Prometheus as children of `supervisor`; return Prometheus's URL
    once it is ready."""
    require_binary()
    directory.mkdir(parents=True, exist_ok=True)
    listen = listen_address(wanted_addr)
    # The discovery next to it (9091 beside 9090), on a fixed port: a restarted discovery child must
    # answer where Prometheus looks.
    _, sd_port = parse_addr(listen_address(f"127.0.0.1:{parse_addr(listen)[1] % 65535 + 1}"))
    sd_port_file = directory / "sd.port"
    sd = supervisor.start(ChildSpec("prometheus-sd", ("prometheus", "sd", "--port", str(sd_port), "--port-file",
                                                      str(sd_port_file), "--consul", registry_addr),
                                    port_file=sd_port_file))  # fmt: skip
    supervisor.wait_port(sd, timeout_s)
    tls_args = ("--tls-ca", str(tls.ca), "--tls-cert", str(tls.cert), "--tls-key", str(tls.key)) if tls else ()
    run = ("prometheus", "run", "--sd-url", f"http://127.0.0.1:{sd_port}/targets", "--listen", listen,
           "--dir", str(directory), *tls_args)
    server = supervisor.start(ChildSpec("prometheus", run))
    url = f"http://{listen}"
    deadline = time.monotonic() + timeout_s
    while not ready(url):
        if not server.alive or time.monotonic() > deadline:
            raise RuntimeError(f"Prometheus did not become ready on {url}: {supervisor.tail(server)}")
        time.sleep(0.1)
    return url
