"""The warehouse: the catalogue store (SQLite) that training writes and the gateway reads.

Its format lives here, below both: training/catalogue.py generates the items and writes them,
the gateway's enricher reads the few display attributes of its matches.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from pathlib import Path

from meshserve.errors import NotFound
from meshserve.inference.artifacts import meshserve_home

CATALOGUE_FILE = "catalogue.sqlite"
SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    item_id INTEGER PRIMARY KEY,
    title TEXT NOT NULL,
    description TEXT NOT NULL,
    price REAL NOT NULL,
    category TEXT NOT NULL,
    width_cm REAL NOT NULL,
    height_cm REAL NOT NULL,
    depth_cm REAL NOT NULL,
    weight_kg REAL NOT NULL,
    listed_at INTEGER NOT NULL,
    shipping_size TEXT NOT NULL,
    violations TEXT NOT NULL,
    look TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS items_listed_at ON items (listed_at);
CREATE INDEX IF NOT EXISTS items_category ON items (category);
"""
COLUMNS = ("item_id", "title", "description", "price", "category", "width_cm", "height_cm",
           "depth_cm", "weight_kg", "listed_at", "shipping_size", "violations", "look")  # fmt: skip
INSERT_ITEM = f"INSERT INTO items ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"


def catalogue_path(home: Path | None = None) -> Path:
    return (home or meshserve_home()) / CATALOGUE_FILE


def connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), timeout=30)
    conn.row_factory = sqlite3.Row
    return conn


def open_existing(home: Path | None) -> sqlite3.Connection:
    path = catalogue_path(home)
    if not path.is_file():
        raise NotFound(f"no catalogue at {path}; run `meshserve train` first")
    return connect(path)


def display_attributes(item_ids: Iterable[int], home: Path | None = None) -> dict[int, dict[str, str]]:
    """item id → title, category and price (two decimals) of the items that exist."""
    ids = [int(i) for i in item_ids]
    if not ids:
        return {}
    conn = open_existing(home)
    try:
        rows = conn.execute(
            f"SELECT item_id, title, category, price FROM items WHERE item_id IN ({', '.join('?' * len(ids))})", ids
        )
        return {int(row["item_id"]): {"title": row["title"], "category": row["category"],
                                      "price": f"{float(row['price']):.2f}"} for row in rows}  # fmt: skip
    finally:
        conn.close()
