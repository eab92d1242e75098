"""Helpers for tests that start real processes: free ports, readiness waits, cleanup.

Every process started through ManagedProcess is recorded until it is stopped; whatever a test run
leaves behind is stopped with its process group by `reap_processes` (called at the end of the run by
tests/conftest.py) or, when the run ends without running any more Python (os._exit from
`--timeout-method=thread`, SIGKILL, the OOM killer), by a guard process that notices the run is gone.
Only the standard library is imported here at module level: this file is also the guard's program.
"""

from __future__ import annotations

import atexit
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import consul

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


def wait_until(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.02, what: str = "") -> T:
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


# -- processes, process groups and the reaper ---------------------------------------------------

REAP_GRACE_S = 3.0  # leftovers get SIGTERM, then SIGKILL if still alive after this long


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state, ppid, pgrp, ...), None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def start_time(pid: int) -> str | None:
    """When `pid` started (clock ticks since boot): with the pid it names one process, not a reused pid."""
    fields = _stat(pid)
    return fields[19] if fields else None


def running(pid: int, started: str | None = None) -> bool:
    """Whether `pid` is alive and not a zombie (and, given `started`, still the process that had it)."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z" and (started is None or fields[19] == started)


def _process_table() -> dict[int, list[str]]:
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = _stat(int(stat.parent.name))
        if fields is not None and fields[0] != "Z":
            table[int(stat.parent.name)] = fields
    return table


def _members(pgids: set[int]) -> dict[int, list[int]]:
    """The live (not zombie) processes of each of `pgids` that still has any."""
    found: dict[int, list[int]] = {}
    for pid, fields in _process_table().items():
        if int(fields[2]) in pgids:
            found.setdefault(int(fields[2]), []).append(pid)
    return found


def descendants(root: int) -> set[int]:
    """Every live process below `root`, from the parent links in /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for pid, fields in _process_table().items():
        children.setdefault(int(fields[1]), []).append(pid)
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _send(signum: int, pgids: Sequence[int] = (), pids: Sequence[int] = ()) -> None:
    for target, kill in [*((g, os.killpg) for g in pgids), *((p, os.kill) for p in pids)]:
        try:
            kill(target, signum)
        except (ProcessLookupError, PermissionError):
            pass


def _wait_while(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while condition() and time.monotonic() < deadline:
        time.sleep(0.05)


def _escalate(alive: Callable[[], bool], term: Callable[[int], None], grace: float) -> None:
    """term(SIGTERM); wait up to `grace` s for alive() to turn false; else term(SIGKILL) and wait a little."""
    term(signal.SIGTERM)
    _wait_while(alive, grace)
    if alive():
        term(signal.SIGKILL)
        _wait_while(alive, 5.0)


def stop_groups(groups: dict[int, str | None], grace: float = REAP_GRACE_S) -> dict[int, list[int]]:
    """Stop whole process groups: SIGTERM, SIGKILL for what is left after `grace` s. `groups` maps a
    group id (its leader's pid) to the leader's start time; a group whose id now names a different
    process (the number reused after ours was gone) is left alone. Returns the live members found."""
    ours = {pgid for pgid, started in groups.items() if start_time(pgid) in (None, started)}
    found = _members(ours)
    if found:
        _escalate(lambda: bool(_members(set(found))), lambda signum: _send(signum, pgids=list(found)), grace)
    return found


_live: dict[int, ManagedProcess] = {}  # every ManagedProcess started and not yet stopped, by pid
_live_lock = threading.RLock()  # re-entrant: conftest's SIGTERM handler may interrupt its holder
_guard: subprocess.Popen[bytes] | None = None
_owner = os.getpid()  # the process that started what is in _live (a fork's copy of it reaps nothing)


def _tell_guard(line: str) -> None:
    """Keep the guard's list of groups up to date (called with _live_lock held)."""
    global _guard
    if _guard is None:
        # its own session: neither a terminal's Ctrl-C nor a kill of this run's process group reaches it
        _guard = subprocess.Popen([sys.executable, "-I", str(Path(__file__).resolve()), "--guard"],
                                  stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)  # fmt: skip
        atexit.register(close_guard)
    try:
        assert _guard.stdin is not None
        _guard.stdin.write(line.encode() + b"\n")
        _guard.stdin.flush()
    except (OSError, ValueError):  # the guard is gone (or closed): the in-process reaper still works
        pass


def guard_pid() -> int | None:
    return _guard.pid if _guard is not None else None


def close_guard() -> None:
    """At exit: stop what is left, then let the guard see EOF with nothing to do, and wait for it."""
    if os.getpid() != _owner:  # a forked copy of the test process: neither is its business
        return
    reap_processes()
    if _guard is not None and _guard.stdin is not None:
        _guard.stdin.close()
        try:
            _guard.wait(timeout=REAP_GRACE_S + 10)
        except subprocess.TimeoutExpired:
            _guard.kill()
            _guard.wait()


def _guard_main() -> None:
    """`python support.py --guard`: stdin says which process groups the test run has started ("+ pid
    start-time") and stopped ("- pid"). At EOF — the run has ended, however it ended — stop the groups
    still listed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    groups: dict[int, str | None] = {}
    for line in sys.stdin:
        match line.split():
            case ["+", pid, started]:
                groups[int(pid)] = None if started == "-" else started
            case ["-", pid]:
                groups.pop(int(pid), None)
    stop_groups(groups)


def reap_processes(grace: float = REAP_GRACE_S) -> list[str]:
    """Stop every ManagedProcess that was started and never stopped, with its whole process group
    (SIGTERM, then SIGKILL after `grace` s). Returns a line for each one that was still running."""
    if os.getpid() != _owner:
        return []
    with _live_lock:
        leftovers = list(_live.values())
    found = stop_groups({proc.pid: proc.started for proc in leftovers}, grace)
    report = [f"pid {proc.pid} (group of {len(found[proc.pid])}): {shlex.join(proc.argv)}"
              for proc in leftovers if proc.pid in found]  # fmt: skip
    for proc in leftovers:
        try:
            proc.stop(grace=0)  # reaps the leader, closes its log, forgets it
        except Exception as exc:  # keep going: the others must be stopped too
            report.append(f"pid {proc.pid}: could not stop it: {exc!r}")
    return report


def reap_descendants(match: str = "meshserve", grace: float = REAP_GRACE_S) -> list[str]:
    """Stop every live process below this one whose arguments mention `match`: servers that code under
    test started itself (LocalMesh's children, a CLI run with Popen) and left running. The guard is spared."""
    found: dict[int, str] = {}
    for pid in descendants(os.getpid()) - {guard_pid()}:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if match.encode() in b" ".join(argv[1:]):
            found[pid] = shlex.join(a.decode(errors="replace") for a in argv if a)
    if found:
        started = {pid: start_time(pid) for pid in found}
        _escalate(
            lambda: any(running(pid, started[pid]) for pid in found),
            lambda signum: _send(signum, pids=[pid for pid in found if running(pid, started[pid])]),
            grace,
        )
    return [f"pid {pid}: {cmd}" for pid, cmd in sorted(found.items())]


class ManagedProcess:
    """A child process whose output goes to a log file and which is always stopped: by stop(), or at the
    end of the test run by the reaper (see the top of this file)."""

    def __init__(self, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None):
        self.argv = list(argv)
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        merged_env = {**os.environ, **(env or {})}
        with _live_lock:  # recorded before anything else can happen to it
            self.proc = subprocess.Popen(
                self.argv,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=merged_env,
                start_new_session=True,  # its own process group, so stop() reaches its children
            )
            self.started = start_time(self.proc.pid)
            self._stopped = False
            _live[self.proc.pid] = self
            _tell_guard(f"+ {self.proc.pid} {self.started or '-'}")

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
        """SIGTERM, then SIGKILL to the whole group after `grace` seconds. Stopping again does nothing."""
        if self._stopped:
            return self.proc.returncode
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        # (the group's id cannot have been handed to another process while anything is still in it)
        if self.alive() or _members({self.proc.pid}):
            _send(signal.SIGKILL, pgids=[self.proc.pid])
        try:
            self.proc.wait(timeout=10)
        finally:
            self._log.close()
        self._stopped = True
        with _live_lock:
            _live.pop(self.proc.pid, None)
            _tell_guard(f"- {self.proc.pid}")
        return self.proc.returncode


def meshserve_argv(*args: str) -> list[str]:
    """The meshserve CLI as a child process of this interpreter."""
    return [sys.executable, "-m", "meshserve.cli", *args]


class Spawner:
    """Starts ManagedProcesses that log to `log_dir`; stop_all() stops them, newest first (servers before
    the registry they deregister from)."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.started: list[ManagedProcess] = []

    def __call__(self, argv: Sequence[str], name: str = "proc", env: dict[str, str] | None = None) -> ManagedProcess:
        proc = ManagedProcess(argv, self.log_dir / f"{name}-{len(self.started)}.log", env=env)
        self.started.append(proc)
        return proc

    def stop_all(self) -> None:
        errors = []
        for proc in reversed(self.started):
            try:
                proc.stop()
            except Exception as exc:  # stop the others anyway
                errors.append(exc)
        if errors:
            raise errors[0]


class DevAgent:
    """A `meshserve registry dev` process on a free port, started through `spawn`, ready once it answers
    /v1/status/leader. stop() then start() restarts it on the same port (and --data-dir)."""

    READY_TIMEOUT_S = 20.0

    def __init__(
        self,
        spawn: Callable[..., ManagedProcess],
        extra_args: Sequence[str] = (),
        data_dir: Path | None = None,
    ):
        self._spawn = spawn
        self.port = free_port()
        self.extra_args = list(extra_args)
        self.data_dir = data_dir
        self._proc: ManagedProcess | None = None

    @property
    def http_addr(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def proc(self) -> ManagedProcess:
        assert self._proc is not None, "the dev agent was never started"
        return self._proc

    def start(self) -> DevAgent:
        args = ["registry", "dev", "--http-addr", f"127.0.0.1:{self.port}", *self.extra_args]
        if self.data_dir is not None:
            args += ["--data-dir", str(self.data_dir)]
        proc = self._proc = self._spawn(meshserve_argv(*args), name="dev-agent")

        def leader_answers() -> bool:
            proc.check_alive()
            with urllib.request.urlopen(f"{self.http_addr}/v1/status/leader", timeout=1) as resp:
                return resp.status == 200

        try:
            wait_until(leader_answers, timeout=self.READY_TIMEOUT_S, what=f"{self.http_addr}/v1/status/leader")
        except BaseException:
            proc.stop()
            raise
        return self

    def client(self, **kwargs: Any) -> consul.Consul:
        """A py-consul client of this agent (`token=...` and the like go to consul.Consul)."""
        import consul

        return consul.Consul(host="127.0.0.1", port=self.port, **kwargs)

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.stop()

    def kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()


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


if __name__ == "__main__" and sys.argv[1:] == ["--guard"]:
    _guard_main()
