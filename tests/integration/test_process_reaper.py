"""The reaper of tests/conftest.py and tests/support.py, tried on real pytest runs that are cut short: a test
failed by pytest-timeout (its signal method, used here) or a fixture that raises after starting a process
leaves nothing running once the run is over — the session's reaper stops it, SIGKILL for what ignores
SIGTERM, grandchildren included; a SIGTERMed run stops what its tests started before it dies; and a run
that ends in os._exit (pytest-timeout's thread method), where no Python runs on the way out, is cleaned up
by the guard process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.support import running, wait_until

REPO = Path(__file__).resolve().parents[2]

# Tests that start a process through the helpers and never stop it. The process (its SIGTERM ignored when
# asked to) starts a child in its process group, which inherits that, and both sleep for ten minutes.
CUT_SHORT = '''
import os, sys, time
from pathlib import Path

import pytest

from tests.support import ManagedProcess, guard_pid, start_time, wait_until

SLEEPER = """
import os, signal, subprocess, sys, time
if sys.argv[1] == "ignore-term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print(os.getpid(), child.pid, flush=True)
time.sleep(600)
"""


def leak(tmp_path, term):
    proc = ManagedProcess([sys.executable, "-c", SLEEPER, term], tmp_path / "sleeper.log")
    pids = wait_until(lambda: proc.output().split(), timeout=60, what="the sleeper and its child")
    with open(os.environ["REAPER_PIDS"], "a") as out:
        for pid in pids:
            out.write(f"{pid} {start_time(int(pid))}\\n")
        out.write(f"guard {guard_pid()}\\n")


@pytest.fixture
def leaked(tmp_path):
    leak(tmp_path, "ignore-term")  # (in a fixture: the run's timeout is for the test function only)


def test_times_out_with_a_process_running(leaked):
    time.sleep(600)


def test_runs_until_sigterm(leaked):
    time.sleep(600)


@pytest.fixture
def half_set_up(tmp_path):
    leak(tmp_path, "die-on-term")
    raise RuntimeError("the fixture fails after starting a process")


def test_fixture_raises_after_starting_a_process(half_set_up):
    pass
'''


def run_cut_short(work: Path, *args: str) -> tuple[subprocess.Popen[str], Path]:
    """A pytest run of CUT_SHORT in `work` with the repo's conftest as a plugin and `args`."""
    work.mkdir()
    (work / "test_cut_short.py").write_text(CUT_SHORT)
    pids = work / "pids"
    argv = [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider", "-q",
            "-o", "asyncio_default_fixture_loop_scope=function", "-o", "timeout_func_only=true", "--rootdir", str(work),
            "--basetemp", str(work / "tmp"), *args, str(work / "test_cut_short.py")]  # fmt: skip
    env = {**os.environ, "REAPER_PIDS": str(pids), "PYTHONPATH": str(REPO)}
    env.pop("PYTEST_ADDOPTS", None)
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, pids


def finish(run: subprocess.Popen[str]) -> str:
    try:
        out, _ = run.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        run.kill()
        out, _ = run.communicate()
        raise AssertionError(f"the cut-short pytest run did not end:\n{out}") from None
    return out


def started(pids_file: Path) -> tuple[dict[int, str], int]:
    """The processes the run's tests started ({pid: start time}) and its guard's pid."""
    lines = [line.split() for line in pids_file.read_text().splitlines()] if pids_file.exists() else []
    procs = {int(pid): start for pid, start in lines if pid != "guard"}
    guards = {int(start) for pid, start in lines if pid == "guard"}
    assert len(guards) == 1, lines
    return procs, guards.pop()


def leaked_and_waiting(run: subprocess.Popen[str], pids_file: Path) -> bool:
    """Whether the run's test has started its process (and is now sleeping)."""
    assert run.poll() is None, "the run ended early"
    return pids_file.exists() and pids_file.read_text().count("guard") == 1


def still_running(procs: dict[int, str]) -> list[int]:
    return [pid for pid, start in procs.items() if running(pid, start)]


def test_a_cut_short_run_leaves_nothing_running(tmp_path: Path) -> None:
    signal_run, signal_pids = run_cut_short(tmp_path / "signal", "--timeout", "2", "-k", "not sigterm")
    thread_run, thread_pids = run_cut_short(tmp_path / "thread", "--timeout", "2", "--timeout-method", "thread",
                                            "-k", "times_out")  # fmt: skip
    sigterm_run, sigterm_pids = run_cut_short(tmp_path / "sigterm", "--timeout", "120", "-k", "sigterm")
    runs = [signal_run, thread_run, sigterm_run]
    leaked: dict[int, str] = {}
    try:
        # signal method: the timed-out test fails, the run goes on; the reaper stops both leftovers
        # before pytest exits, and says so
        out = finish(signal_run)
        procs, signal_guard = started(signal_pids)
        leaked.update(procs)
        assert signal_run.returncode == 1, out
        assert "Timeout" in out and "1 failed" in out and "1 error" in out, out
        assert len(procs) == 4, out  # two sleepers and their children
        assert still_running(procs) == [], out
        summary = out.split("stopped by the reaper", 1)[-1]  # each sleeper, with its child in its group
        assert sum(f"pid {pid} (group of 2)" in summary for pid in procs) == 2, out

        # thread method: os._exit(1) at the timeout, nothing runs on the way out; the guard stops the
        # leftover (SIGTERM ignored: SIGKILL after the grace period) and exits
        out = finish(thread_run)
        procs, thread_guard = started(thread_pids)
        leaked.update(procs)
        assert thread_run.returncode == 1 and "Timeout" in out, out
        assert len(procs) == 2, out
        wait_until(lambda: not still_running(procs), timeout=30, what=f"the guard to stop {still_running(procs)}")

        # SIGTERM: the handler stops the leftover (SIGKILL after the grace period), then pytest dies of it
        wait_until(lambda: leaked_and_waiting(sigterm_run, sigterm_pids), timeout=60, what="the test's process")
        sigterm_run.send_signal(signal.SIGTERM)
        out = finish(sigterm_run)
        procs, sigterm_guard = started(sigterm_pids)
        leaked.update(procs)
        assert sigterm_run.returncode == -signal.SIGTERM, out
        assert len(procs) == 2 and still_running(procs) == [], out

        guards = [signal_guard, thread_guard, sigterm_guard]
        wait_until(lambda: not any(running(pid) for pid in guards), timeout=30, what="the guards to exit")
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
                run.communicate()
        for pid in still_running(leaked):  # a failed test leaves nothing either
            os.kill(pid, signal.SIGKILL)
