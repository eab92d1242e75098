"""Shared fixtures: processes started here are always stopped, also on failure."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from tests.support import ManagedProcess


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., ManagedProcess]]:
    """Start real processes; every one of them is stopped when the test ends."""
    started: list[ManagedProcess] = []

    def _spawn(
        argv: Sequence[str], name: str = "proc", env: dict[str, str] | None = None
    ) -> ManagedProcess:
        proc = ManagedProcess(argv, tmp_path / f"{name}-{len(started)}.log", env=env)
        started.append(proc)
        return proc

    yield _spawn
    for proc in reversed(started):
        proc.stop()


class DevAgent:
    """A `meshserve registry dev` child process on a free port (restartable on the same port)."""

    def __init__(
        self,
        spawn: Callable[..., ManagedProcess],
        extra_args: Sequence[str] = (),
        data_dir: Path | None = None,
    ):
        from tests.support import free_port

        self._spawn = spawn
        self.port = free_port()
        self.extra_args = list(extra_args)
        self.data_dir = data_dir
        self.proc: ManagedProcess | None = None

    @property
    def http_addr(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> DevAgent:
        import urllib.request

        from tests.support import meshserve_argv, wait_until

        args = ["registry", "dev", "--http-addr", f"127.0.0.1:{self.port}", *self.extra_args]
        if self.data_dir is not None:
            args += ["--data-dir", str(self.data_dir)]
        self.proc = self._spawn(meshserve_argv(*args), name="dev-agent")

        def leader_answers() -> bool:
            assert self.proc is not None
            self.proc.check_alive()
            with urllib.request.urlopen(f"{self.http_addr}/v1/status/leader", timeout=1) as resp:
                return resp.status == 200

        wait_until(leader_answers, timeout=20, what="dev agent /v1/status/leader")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()


@pytest.fixture
def start_dev_agent(
    spawn: Callable[..., ManagedProcess],
) -> Callable[..., DevAgent]:
    """Factory: `start_dev_agent(extra_args=[...], data_dir=...)` → a running DevAgent."""

    def _start(extra_args: Sequence[str] = (), data_dir: Path | None = None) -> DevAgent:
        return DevAgent(spawn, extra_args, data_dir).start()

    return _start


@pytest.fixture
def dev_agent(start_dev_agent: Callable[..., DevAgent]) -> DevAgent:
    """A running dev agent with default flags, stopped after the test."""
    return start_dev_agent()
