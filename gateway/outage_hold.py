"""Holding a registry's all-critical answer that comes right after an outage.

A registry that runs the health checks itself (the dev agent) sees every replica critical while it
is cut off from them, and may still say so in its first answers once it is back. Applied as they
are, those answers would empty a route that was fine all along. So for a few seconds after an
outage, an answer with no passing replica for a route that had some is held, then applied if
nothing changed; an answer with any passing replica applies at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable

from meshserve.gateway.discovery import Registered

log = logging.getLogger(__name__)

SETTLE_AFTER_OUTAGE_S = 5.0


class OutageHold:
    """Per watched service: whether the registry was away, and until when its answers settle."""

    def __init__(self) -> None:
        self._away: set[str] = set()  # services whose watch found the registry away
        self._settling_until: dict[str, float] = {}  # service → monotonic end of its hold

    def went_away(self, service: str) -> None:
        self._away.add(service)

    def answered(self, service: str) -> None:
        """A fresh answer for `service`: the first one after an outage starts its settling time."""
        if service in self._away:
            self._away.discard(service)
            self._settling_until[service] = time.monotonic() + SETTLE_AFTER_OUTAGE_S

    def holds(self, service: str, registered: Iterable[Registered], routed_before: bool,
              apply_later: Callable[[], None]) -> bool:  # fmt: skip
        """True if this answer waits: it has no passing replica, the route had some
        (`routed_before`) and the service is still settling. `apply_later()` runs when the
        settling time is over, to apply the answer the registry holds by then."""
        left = self._settling_until.get(service, 0.0) - time.monotonic()
        if left <= 0 or any(r.passing for r in registered) or not routed_before:
            return False
        log.warning("%s: no passing replica just after the registry came back; keeping the last "
                    "known set for %.1fs while its checks settle", service, left)  # fmt: skip
        asyncio.get_running_loop().call_later(left, apply_later)
        return True
