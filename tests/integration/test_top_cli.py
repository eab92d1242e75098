"""`meshserve top` in a pseudo-terminal over the dev agent and a real server: it refreshes, and when the
registry goes away it keeps scraping the replicas it last saw and says the list is stale."""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import time
from collections.abc import Callable

from tests.integration.identity_server import start_identity
from tests.support import free_port, meshserve_argv


def read_frames(master: int, until: Callable[[str], bool], timeout: float) -> str:
    screen, deadline = "", time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([master], [], [], 0.5)[0]:
            try:
                screen += os.read(master, 65536).decode(errors="replace")
            except OSError:
                break
            frame = screen.rsplit("\x1b[H\x1b[2J", 1)[-1]
            if until(frame):
                return frame
    raise TimeoutError(f"the screen never showed what was expected; last output:\n{screen[-3000:]}")


def test_top_keeps_showing_the_last_known_replicas_while_the_registry_is_away(dev_agent, spawn) -> None:
    server = start_identity(spawn, "--metrics-port", "0", register=True, consul=dev_agent.http_addr)
    replica = f"meshserve-identity-127.0.0.1-{server.port}"
    master, slave = pty.openpty()
    proc = subprocess.Popen(meshserve_argv("top", "--consul", dev_agent.http_addr, "--interval", "0.5"),
                            stdin=slave, stdout=slave, stderr=slave, start_new_session=True)  # fmt: skip
    os.close(slave)
    try:
        frame = read_frames(master, lambda f: replica in f and "passing" in f and "tot" not in f, timeout=60)
        assert "meshserve-identity" in frame and "STALE" not in frame
        dev_agent.stop()

        def stale_but_scraped(frame: str) -> bool:  # its /metrics still answer ("ok"), the registry does not
            rows = [line.split() for line in frame.splitlines() if line.startswith(replica)]
            return "STALE: " in frame and bool(rows) and rows[0][-1] == "ok"

        frame = read_frames(master, stale_but_scraped, timeout=60)
        assert "meshserve-identity" in frame and "Consul at" in frame
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        os.close(master)


def test_top_without_a_registry_says_so_and_exits_1() -> None:
    done = subprocess.run(meshserve_argv("top", "--once", "--consul", f"http://127.0.0.1:{free_port()}"),
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 1 and "unreachable" in done.stderr and "Traceback" not in done.stderr
    bad = subprocess.run(meshserve_argv("top", "--interval", "0"), capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--interval" in bad.stderr
