"""`meshserve health` against real servers: exit 0 only on SERVING, 1 for everything else."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable

from tests.integration.identity_server import PREDICTION_SERVICE, start_identity
from tests.support import ManagedProcess, free_port, meshserve_argv, wait_until


def health(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        meshserve_argv("health", *args), capture_output=True, text=True, timeout=60
    )


def test_serving_identity_server_exits_zero_for_server_and_prediction_service(
    spawn: Callable[..., ManagedProcess],
) -> None:
    server = start_identity(spawn)
    whole = health(server.target)
    assert whole.returncode == 0, whole.stderr
    assert "SERVING" in whole.stdout
    named = health(server.target, "--service", PREDICTION_SERVICE, "--timeout", "5")
    assert named.returncode == 0, named.stderr
    assert PREDICTION_SERVICE in named.stdout


def test_unknown_service_name_is_unhealthy(spawn: Callable[..., ManagedProcess]) -> None:
    server = start_identity(spawn)
    result = health(server.target, "--service", "no.such.Service")
    assert result.returncode == 1
    assert "NOT_FOUND" in result.stderr


def test_stopped_server_is_unhealthy(spawn: Callable[..., ManagedProcess]) -> None:
    server = start_identity(spawn)
    assert health(server.target).returncode == 0
    server.proc.signal(signal.SIGTERM)
    assert server.proc.wait(timeout=30) == 0
    result = health(server.target, "--timeout", "1")
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr


def test_not_serving_is_unhealthy_and_flips_back(spawn: Callable[..., ManagedProcess]) -> None:
    port = free_port()
    target = spawn(
        [sys.executable, "-m", "tests.health_target", "--port", str(port), "--status", "NOT_SERVING"],
        name="health-target",
    )  # fmt: skip
    wait_until(lambda: (target.check_alive(), "ready on" in target.output())[1],
               timeout=20, what="health target ready")  # fmt: skip
    not_serving = health(f"127.0.0.1:{port}")
    assert not_serving.returncode == 1
    assert "NOT_SERVING" in not_serving.stderr
    target.signal(signal.SIGUSR1)
    wait_until(lambda: health(f"127.0.0.1:{port}").returncode == 0, timeout=20,
               interval=0.2, what="SERVING after SIGUSR1")  # fmt: skip


def test_bad_target_is_a_clear_error_not_a_crash() -> None:
    for bad, says in (("localhost", "has no port"), (":50051", "has no host"),
                      ("h:99999", "port must be"), ("::1:50051", "brackets")):  # fmt: skip
        result = health(bad)
        assert result.returncode == 1, bad
        assert says in result.stderr, (bad, result.stderr)
        assert "Traceback" not in result.stderr
