"""Helpers for tests that start real processes: free ports, readiness waits, cleanup."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


# Ports handed to child servers come from below the kernel's ephemeral range
# (net.ipv4.ip_local_port_range, 32768-60999 by default): a port taken from that
# range by binding port 0 can be handed out again as the local end of any outgoing
# connection before the child binds it, which made servers fail with "Address
# already in use". Each port is handed out once per test session.
_PORT_FLOOR, _PORT_CEILING = 20000, 32000
_next_port = _PORT_FLOOR + random.Random(os.getpid()).randrange(_PORT_CEILING - _PORT_FLOOR)


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on, outside the ephemeral range."""
    global _next_port
    low, high = _ephemeral_range()
    for _ in range(_PORT_CEILING - _PORT_FLOOR):
        port = _next_port
        _next_port = _PORT_FLOOR + (_next_port + 1 - _PORT_FLOOR) % (_PORT_CEILING - _PORT_FLOOR)
        if not low <= port <= high and _bindable(port):
            return port
    raise RuntimeError(f"no free port in {_PORT_FLOOR}-{_PORT_CEILING} outside the ephemeral range")


class ProcessDied(AssertionError):
    """Raised from a wait_until predicate: stop waiting, the thing will never come up."""


def wait_until(
    predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.02, what: str = ""
) -> T:
    """Poll `predicate` until it returns something truthy; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except ProcessDied:
            raise
        except Exception as exc:  # the thing may not be up yet
            last_error = exc
        else:
            if value:
                return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what or predicate}: {last_error!r}")


class ManagedProcess:
    """A child process whose output goes to a log file and which is always stopped."""

    def __init__(self, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None):
        self.argv = list(argv)
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        merged_env = {**os.environ, **(env or {})}
        self.proc = subprocess.Popen(
            self.argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=merged_env,
            start_new_session=True,  # its own process group, so stop() reaches its children
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, signum: int) -> None:
        if self.alive():
            self.proc.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL, the way a crash or the OOM killer would end it."""
        self.signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def check_alive(self) -> None:
        """Raise ProcessDied with the process's output if it has exited."""
        if not self.alive():
            raise ProcessDied(f"{self.argv} exited with {self.proc.returncode}:\n{self.output()}")

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL to the whole group after `grace` seconds."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(timeout=10)
        finally:
            self._log.close()
        return self.proc.returncode


def meshserve_argv(*args: str) -> list[str]:
    """The meshserve CLI as a child process of this interpreter."""
    return [sys.executable, "-m", "meshserve.cli", *args]


def wait_serving(target: str, proc: ManagedProcess | None = None, timeout: float = 60.0) -> None:
    """Wait until the gRPC server at `target` reports SERVING (failing at once if `proc` died)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    def serving() -> bool:
        if proc is not None:
            proc.check_alive()
        with grpc.insecure_channel(target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    wait_until(serving, timeout=timeout, what=f"{target} SERVING")
