"""Catalogue enrichment of matches: the warehouse read through a TTL data cache, off the event loop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from pathlib import Path

from meshserve.gateway.cache import TTLCache
from meshserve.warehouse import display_attributes

log = logging.getLogger(__name__)

Attributes = dict[str, str]


def _row_bytes(item_id: str, attributes: Attributes) -> int:
    """Roughly what one cached catalogue row holds, Python's object overheads included."""
    return 200 + len(item_id) + sum(100 + len(k) + len(v) for k, v in attributes.items())


class CatalogueEnricher:
    """item id → display attributes (title, category, price), cached for `ttl_s`.

    Changing data needs refresh: a row is re-read after its TTL, so an edited listing shows
    its new title within ttl_s. When the warehouse cannot be read, matches go out without
    attributes rather than failing the search.
    """

    def __init__(self, home: Path | None, ttl_s: float = 60.0, max_items: int = 100_000,
                 max_bytes: int = 64 * 1024 * 1024):  # fmt: skip
        self.home = home
        self.cache: TTLCache[str, Attributes] = TTLCache("catalogue", max_items, ttl_s, max_bytes, _row_bytes)

    async def lookup(self, item_ids: Iterable[str]) -> dict[str, Attributes]:
        wanted = set(item_ids)
        found: dict[str, Attributes] = {}
        missing = []
        for item_id in wanted:
            cached = self.cache.get(item_id)
            if cached is None:
                missing.append(item_id)
            else:
                found[item_id] = cached
        if missing:
            try:
                fresh = await asyncio.get_running_loop().run_in_executor(None, self._read, missing)
            except Exception as exc:  # noqa: BLE001 - enrichment is best effort
                log.warning("catalogue unavailable for enrichment: %s", exc)
                fresh = {}
            for item_id, attributes in fresh.items():
                self.cache.put(item_id, attributes)
            found.update(fresh)
        return found

    def _read(self, item_ids: list[str]) -> dict[str, Attributes]:
        numeric = [int(i) for i in item_ids if i.isdigit()]
        return {str(item_id): attributes for item_id, attributes in display_attributes(numeric, self.home).items()}
