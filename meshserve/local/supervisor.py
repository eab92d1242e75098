"""Child processes of `meshserve up`: started in order, watched, restarted when they crash, and all
stopped on the way out — also when the supervisor itself is killed (the kernel's parent-death signal)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

PARENT_ENV = "MESHSERVE_SUPERVISOR_PID"  # child.py dies with this process (see meshserve/children.py)


@dataclass(frozen=True)
class ChildSpec:
    name: str
    args: tuple[str, ...]  # meshserve subcommand and flags
    env: tuple[tuple[str, str], ...] = ()
    restart: bool = True
    port_file: Path | None = None  # written by the child once it listens

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "meshserve.local.child", *self.args]  # see child.py: no slow teardown


@dataclass
class Child:
    spec: ChildSpec
    proc: subprocess.Popen[bytes]
    log_path: Path
    started_at: float = field(default_factory=time.monotonic)
    restarts: int = 0
    next_restart: float = 0.0

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def port(self) -> int | None:
        path = self.spec.port_file
        if path is None or not path.is_file():
            return None
        text = path.read_text().strip()
        return int(text) if text.isdigit() else None


class Supervisor:
    """Call start() and check() from a thread that lives as long as the supervisor: the kernel sends the
    parent-death signal when the *thread* that forked a child ends."""

    def __init__(self, log_dir: Path, base_env: dict[str, str] | None = None):
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.base_env = {**os.environ, **(base_env or {})}
        self.children: list[Child] = []

    def start(self, spec: ChildSpec) -> Child:
        if spec.port_file is not None:
            spec.port_file.unlink(missing_ok=True)
        log_path = self.log_dir / f"{spec.name}.log"
        with open(log_path, "ab") as log_file:
            # No preexec_fn: Python code run between fork and exec can crash the child when other threads
            # (gRPC's, a load test's) hold locks at the fork; child.py sets the parent-death signal itself.
            # Its own process group: a terminal's Ctrl-C reaches the supervisor only, which stops children
            # in order.
            proc = subprocess.Popen(spec.argv(), stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                    env={**self.base_env, **dict(spec.env), PARENT_ENV: str(os.getpid())},
                                    process_group=0)  # fmt: skip
        child = Child(spec, proc, log_path)
        self.children.append(child)
        return child

    def wait_port(self, child: Child, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            port = child.port()
            if port:
                return port
            if not child.alive:
                raise RuntimeError(f"{child.spec.name} exited with {child.proc.returncode}: {self.tail(child)}")
            time.sleep(0.05)
        raise TimeoutError(f"{child.spec.name} did not start listening in {timeout:.0f}s: {self.tail(child)}")

    def tail(self, child: Child, lines: int = 15) -> str:
        try:
            return "\n".join(child.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def check(self) -> list[str]:
        """Restart crashed children (with backoff); return a line for each event."""
        events = []
        now = time.monotonic()
        for i, child in enumerate(self.children):
            if child.alive or not child.spec.restart:
                continue
            if child.next_restart == 0.0:
                delay = min(30.0, 0.5 * 2**child.restarts)
                child.next_restart = now + delay
                events.append(f"{child.spec.name} exited with {child.proc.returncode}; restarting in {delay:.1f}s")
            elif now >= child.next_restart:
                replacement = self.start(child.spec)
                self.children.pop()  # start() appended it; keep the original position
                replacement.restarts = child.restarts + 1
                self.children[i] = replacement
                events.append(f"{child.spec.name} restarted (pid {replacement.proc.pid})")
        return events

    def stop_all(self, grace: float = 15.0, first: Sequence[str] = (), last: Sequence[str] = ()) -> None:
        """SIGTERM every child in three waves — those named in `first`, then the rest, then those in
        `last` — each wave waited for up to `grace` seconds; finally SIGKILL every process group left."""
        by_name = {c.spec.name: c for c in self.children}
        wave_one = [by_name[n] for n in first if n in by_name]
        wave_three = [by_name[n] for n in last if n in by_name]
        wave_two = [c for c in reversed(self.children) if c not in wave_one and c not in wave_three]
        for wave in (wave_one, wave_two, wave_three):
            for child in wave:
                if child.alive:
                    child.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace
            for child in wave:
                self._wait(child, max(0.1, deadline - time.monotonic()))
        for child in self.children:
            try:
                os.killpg(child.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                child.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                log.error("%s (pid %d) did not exit after SIGKILL", child.spec.name, child.proc.pid)

    @staticmethod
    def _wait(child: Child, timeout: float) -> None:
        try:
            child.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
