"""What a search request may carry, and what the gateway's caches may hold: every field bounded, the
result cache bounded by bytes as well as entries."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from meshserve.errors import InvalidInput
from meshserve.gateway.cache import TTLCache
from meshserve.gateway.enrich import CatalogueEnricher
from meshserve.gateway.photo_search import PhotoSearch, SearchConfig, SearchQuery, SearchResult, cached_bytes
from meshserve.gateway.policy import default_policies
from meshserve.gateway.routes import RouteTable
from meshserve.registry.config import RegistryConfig


def png(side: int = 8) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (side, side)).save(out, format="PNG")
    return out.getvalue()


def search() -> PhotoSearch:
    routes = RouteTable(RegistryConfig("http://127.0.0.1:1"), default_policies())
    return PhotoSearch(routes, CatalogueEnricher(None), SearchConfig())


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"labels": tuple(f"l{i}" for i in range(65))}, "labels: 65 labels exceed the limit of 64"),
        ({"labels": ("x" * 129,)}, "labels: a label of 129 bytes exceeds the limit of 128"),
        ({"labels": ("é" * 65,)}, "labels: a label of 130 bytes"),
        ({"user_id": "u" * 257}, "user_id: 257 bytes exceed the limit of 256"),
        ({"top_k": 101}, "top_k"),
        ({"min_score": float("nan")}, "min_detection_score"),
        ({"min_score": -0.5}, "min_detection_score"),
    ],
    ids=["too-many-labels", "label-too-long", "label-too-many-bytes", "user-id-too-long", "top-k", "nan-score",
         "negative-score"],
)
def test_each_request_field_is_bounded_and_named(fields: dict, words: str) -> None:
    with pytest.raises(InvalidInput, match=words):
        search().validate(SearchQuery(image=png(), **fields))


def test_the_limits_themselves_are_accepted() -> None:
    labels = tuple(f"{i:03d}" + "x" * 125 for i in range(64))
    assert search().validate(SearchQuery(image=png(), labels=labels, user_id="u" * 256)) == (10, 0.3)


def test_cache_keeps_to_its_byte_budget_dropping_the_least_recently_used() -> None:
    cache: TTLCache[str, bytes] = TTLCache("test-bytes", 1000, 60, max_bytes=1000, size_of=lambda k, v: len(v))
    for i in range(5):
        cache.put(f"k{i}", b"x" * 300)
    assert cache.bytes <= 1000 and len(cache) == 3
    assert cache.get("k0") is None and cache.get("k1") is None and cache.get("k4") is not None
    cache.put("k2", b"x" * 100)  # replacing an entry gives back its bytes
    assert cache.bytes == 700
    cache.put("huge", b"x" * 1001)  # bigger than the whole budget: not kept, nothing evicted for it
    assert cache.get("huge") is None and len(cache) == 3


def test_cached_bytes_grows_with_the_labels_in_the_key() -> None:
    result = SearchResult((), 1, 1, (), {})
    small = cached_bytes(("digest", 10, 0.3, ("a",), "d", "e", ("s",)), result)
    large = cached_bytes(("digest", 10, 0.3, tuple("x" * 128 + str(i) for i in range(64)), "d", "e", ("s",)),
                         result)  # fmt: skip
    assert large - small >= 64 * 128
