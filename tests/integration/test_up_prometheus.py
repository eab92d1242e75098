"""`meshserve up --prometheus`: prints Prometheus's URL, every server of the table is an up target there (scraped
over HTTPS with a mesh client certificate: `up` runs with mTLS), and Ctrl-C stops Prometheus and its service
discovery with the rest."""

from __future__ import annotations

import json
import re
import signal
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.test_local_mesh import STOP_TIMEOUT_S, Up, listening
from tests.support import free_port, wait_until

pytestmark = pytest.mark.slow


def test_up_with_prometheus_prints_its_url_scrapes_every_server_and_stops_it(
    home_copy: Callable[[], Path], tmp_path: Path
) -> None:
    prometheus_port, home = free_port(), home_copy()
    up = Up(home, tmp_path, "--detectors", "1", "--embedders", "1", "--shards", "1", "--prometheus",
            "--prometheus-addr", f"127.0.0.1:{prometheus_port}", "--nats-addr", f"127.0.0.1:{free_port()}")  # fmt: skip
    try:
        # every meshserve process serves /metrics (the job worker too); the registry and NATS do not
        rows = [r for r in up.wait_up() if r.role not in ("registry", "nats")]
        assert "worker" in {r.role for r in rows}
        table = up.proc.output().split("meshserve is up:", 1)[1]
        url = re.search(r"^prometheus\s+(http://\S+)", table, re.M)
        assert url and url[1] == f"http://127.0.0.1:{prometheus_port}", table
        config = json.loads((home / "up" / "prometheus" / "prometheus.yml").read_text())
        assert config["scrape_configs"][0]["http_sd_configs"][0]["refresh_interval"] == "2s"

        def up_targets() -> set[int]:
            with urllib.request.urlopen(f"{url[1]}/api/v1/targets?state=active", timeout=5) as resp:
                active = json.load(resp)["data"]["activeTargets"]
            secure = [t["scrapeUrl"].startswith("https://") and t["labels"]["job"] == "meshserve" for t in active]
            assert all(secure), active
            ports = {int(t["labels"]["instance_id"].rsplit("-", 1)[1]) for t in active if t["health"] == "up"}
            return ports if ports >= {r.port for r in rows} else set()

        wait_until(up_targets, timeout=60, interval=0.5, what="every server of the table an up target")
        up.proc.signal(signal.SIGINT)
        assert up.proc.wait(timeout=STOP_TIMEOUT_S) == 0, up.proc.output()[-3000:]
        assert not listening(prometheus_port)
    finally:
        up.stop()

