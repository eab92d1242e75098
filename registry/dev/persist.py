"""Atomic on-disk snapshots of the dev agent's state (write temp, fsync, rename), group-committed."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STATE_FILE = "meshserve-dev-agent.json"
_write_lock = threading.Lock()  # a cancelled background write may still be running


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that a crash leaves either the old or the new file."""
    with _write_lock:
        _write_atomic_locked(path, data)


def _write_atomic_locked(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


LOCK_FILE = "meshserve-dev-agent.lock"


def lock(data_dir: Path) -> int:
    """Hold the data dir for this process: two agents writing one state would lose updates."""
    import fcntl

    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise SystemExit(
            f"{data_dir} is in use by another dev agent; give each its own --data-dir"
        ) from None
    return fd


def load(data_dir: Path) -> dict[str, Any] | None:
    path = data_dir / STATE_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_bytes())
        if not isinstance(data, dict) or data.get("version") != 1:
            raise ValueError("not a version 1 dev agent state")
        return data
    except (OSError, ValueError) as exc:
        raise SystemExit(
            f"cannot read the dev agent state {path}: {exc}; move it away to start empty"
        ) from exc


class Persister:
    """Saves snapshots in the background; `flush()` waits until the current state is on disk."""

    def __init__(self, data_dir: Path, snapshot: Callable[[], dict[str, Any]]):
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / STATE_FILE
        self._snapshot = snapshot
        self._wanted = 0  # generation of the newest change
        self._saved = 0  # generation known to be on disk
        self._wake = asyncio.Event()
        self._saved_cond = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="persist")

    def mark_dirty(self) -> None:
        self._wanted += 1
        self._wake.set()

    async def flush(self, timeout: float = 10.0) -> None:
        """Wait until every change so far is on disk; TimeoutError if the disk will not take it."""
        target = self._wanted
        if self._saved >= target:
            return
        self._wake.set()
        async with self._saved_cond:
            await asyncio.wait_for(self._saved_cond.wait_for(lambda: self._saved >= target),
                                   timeout)

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            generation = self._wanted
            if generation == self._saved:
                continue
            try:
                # Serialise on the loop (a consistent view), write off the loop (fsync is slow).
                data = json.dumps(self._snapshot(), separators=(",", ":")).encode()
                await asyncio.to_thread(write_atomic, self.path, data)
            except Exception:
                log.exception("cannot save the dev agent state to %s; retrying", self.path)
                await asyncio.sleep(1.0)
                self._wake.set()
                continue
            async with self._saved_cond:
                self._saved = generation
                self._saved_cond.notify_all()

    async def close(self) -> None:
        """Final save, then stop."""
        if self._task is None:
            return
        data = json.dumps(self._snapshot(), separators=(",", ":")).encode()
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        await asyncio.to_thread(write_atomic, self.path, data)
