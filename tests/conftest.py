"""Shared fixtures: processes started here are always stopped, also on failure — and whatever a test run
leaves running anyway (a test killed by pytest-timeout, a fixture that raised half-way) is stopped at the
end of the run by the reaper below (see also tests/support.py)."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from tests.support import DevAgent, ManagedProcess, Spawner, reap_descendants, reap_processes

__all__ = ["DevAgent", "module_dev_agent"]  # DevAgent: tests import it from here too


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., ManagedProcess]]:
    """Start real processes; every one of them is stopped when the test ends (newest first)."""
    spawner = Spawner(tmp_path)
    yield spawner
    spawner.stop_all()


@pytest.fixture
def start_dev_agent(
    spawn: Callable[..., ManagedProcess],
) -> Callable[..., DevAgent]:
    """Factory: `start_dev_agent(extra_args=[...], data_dir=...)` → a running DevAgent, stopped with the
    test's other processes when it ends."""

    def _start(extra_args: Sequence[str] = (), data_dir: Path | None = None) -> DevAgent:
        return DevAgent(spawn, extra_args, data_dir).start()

    return _start


@pytest.fixture
def dev_agent(start_dev_agent: Callable[..., DevAgent]) -> DevAgent:
    """A running dev agent with default flags, stopped after the test."""
    return start_dev_agent()


def module_dev_agent(*extra_args: str) -> Any:
    """A module-scoped fixture: one dev agent started with `extra_args`, shared by the module's tests,
    which must still be running when they are done. Name it in the module: `agent = module_dev_agent(...)`."""

    @pytest.fixture(scope="module")
    def _agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevAgent]:
        spawner = Spawner(tmp_path_factory.mktemp("dev-agent"))
        try:
            agent = DevAgent(spawner, extra_args).start()
            yield agent
            assert agent.proc.alive(), agent.proc.output()
        finally:
            spawner.stop_all()

    return _agent


# -- the reaper --------------------------------------------------------------------------------------
#
# pytest-timeout uses its "signal" method here (SIGALRM exists; pyproject does not choose one): the timed-out
# test raises, its fixtures tear down, and the fixture below runs last. With `--timeout-method=thread` (or
# SIGKILL, or the OOM killer) the run ends in os._exit and no Python runs on the way out: then the guard
# process of tests/support.py stops what is left. (support.py also reaps in an atexit handler.)

_reaped: list[str] = []  # what the reaper had to stop, for the summary
_previous_sigterm: Any = signal.SIG_DFL


def _restore_sigterm() -> None:
    # (None: the previous handler was not set from Python)
    signal.signal(signal.SIGTERM, signal.SIG_DFL if _previous_sigterm is None else _previous_sigterm)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    """Stop what the tests started, then die of the SIGTERM as we would have without this handler."""
    reap_processes()
    _restore_sigterm()
    os.kill(os.getpid(), signal.SIGTERM)


@pytest.fixture(scope="session", autouse=True)
def _reap_leftover_processes() -> Iterator[None]:
    """At the end of the run stop every process the test helpers started and nobody stopped, with its
    process group, and every meshserve process still running below this one (SIGTERM, then SIGKILL)."""
    global _previous_sigterm
    try:
        _previous_sigterm = signal.signal(signal.SIGTERM, _on_sigterm)
        installed = True
    except ValueError:  # not the main thread
        installed = False
    try:
        yield
    finally:
        if installed:
            _restore_sigterm()
        _reaped.extend(reap_processes())
        _reaped.extend(reap_descendants())


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _reaped:
        terminalreporter.section("processes left running by the tests, stopped by the reaper", sep="!")
        for line in _reaped:
            terminalreporter.line(line)
