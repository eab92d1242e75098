"""Listing features shared by training and serving: hashed word n-grams and numeric columns."""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Sequence

import numpy as np

from meshserve.errors import InvalidInput

_TOKEN = re.compile(r"[a-z0-9]+")
MAX_TOKENS = 512  # per listing; longer text is cut, so one request's cost stays bounded


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())[:MAX_TOKENS]


def ngram_ids(text: str, buckets: int, ngrams: int = 2) -> list[int]:
    """Hashed ids of the word 1..n-grams of `text` (crc32: stable across processes)."""
    words = tokens(text)
    grams: set[str] = set(words)
    for n in range(2, ngrams + 1):
        grams.update(" ".join(words[i : i + n]) for i in range(len(words) - n + 1))
    return sorted({zlib.crc32(g.encode()) % buckets for g in grams})


def bag_offsets(texts: Sequence[str], buckets: int, ngrams: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Flat ids and per-row offsets, the input form of torch's EmbeddingBag."""
    ids: list[int] = []
    offsets: list[int] = []
    for text in texts:
        offsets.append(len(ids))
        row = ngram_ids(text, buckets, ngrams)
        ids.extend(row if row else [0])  # an empty text still needs one bucket to sum over
    return np.asarray(ids, dtype=np.int64), np.asarray(offsets, dtype=np.int64)


def as_text(value: bytes | str, field: str) -> str:
    """A BYTES element as text; invalid UTF-8 is an input error, not a crash."""
    if isinstance(value, str):
        return value
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"{field} is not valid UTF-8: {exc.reason} at byte {exc.start}") from None


def finite_column(values: np.ndarray | Sequence[float], field: str, *, positive: bool) -> np.ndarray:
    """A float64 column, refusing NaN/inf and (when `positive`) values ≤ 0."""
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    bad = ~np.isfinite(arr)
    if positive:
        bad |= arr <= 0
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        need = "a finite number > 0" if positive else "a finite number"
        raise InvalidInput(f"{field}[{i}] = {arr[i]!r}; need {need}")
    return arr


def one_hot(values: Sequence[str], vocabulary: Sequence[str], field: str) -> np.ndarray:
    """One-hot rows; an unknown value is all zeros (a listing may use a category we never saw)."""
    index = {name: i for i, name in enumerate(vocabulary)}
    out = np.zeros((len(values), len(vocabulary)), dtype=np.float32)
    for row, value in enumerate(values):
        j = index.get(value)
        if j is not None:
            out[row, j] = 1.0
    return out


def log1p_safe(x: float) -> float:
    return math.log1p(max(x, 0.0))
