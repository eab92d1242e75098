"""The event loop every meshserve server runs on: uvloop when installed, else asyncio's own.

uvloop's loop costs less CPU per call than asyncio's (bench/event_loop.py), and a search pays that
in every process it passes. MESHSERVE_EVENT_LOOP=asyncio picks asyncio's loop anyway.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
ENV = "MESHSERVE_EVENT_LOOP"


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop constructor, or None for asyncio's default."""
    wanted = os.environ.get(ENV, "uvloop")
    if wanted not in ("uvloop", "asyncio"):
        raise SystemExit(f"meshserve: {ENV} must be uvloop or asyncio, not {wanted!r}")
    if wanted == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:  # an install without the optional speed-up
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run(main) on the chosen loop."""
    try:
        factory = loop_factory()
    except SystemExit:
        main.close()
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
