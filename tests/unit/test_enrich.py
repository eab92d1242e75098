"""The gateway's enrichment reads the warehouse training wrote: display attributes by item id."""

from __future__ import annotations

from pathlib import Path

from meshserve import warehouse
from meshserve.gateway.enrich import CatalogueEnricher
from meshserve.training.catalogue import build_catalogue, load_items


async def test_matches_get_title_category_and_price_of_their_item(tmp_path: Path) -> None:
    build_catalogue(n_items=12, seed=3, home=tmp_path)
    items = {str(item.item_id): item for item in load_items(tmp_path)}
    wanted = sorted(items)[:3]

    found = await CatalogueEnricher(tmp_path).lookup([*wanted, "999999", "not-an-id"])

    assert sorted(found) == wanted  # unknown and malformed ids get no attributes
    for item_id in wanted:
        item = items[item_id]
        assert found[item_id] == {"title": item.title, "category": item.category, "price": f"{item.price:.2f}"}


async def test_rows_are_served_from_the_cache_until_their_ttl(tmp_path: Path) -> None:
    build_catalogue(n_items=5, seed=3, home=tmp_path)
    enricher = CatalogueEnricher(tmp_path, ttl_s=60)
    item_id = str(load_items(tmp_path)[0].item_id)
    first = await enricher.lookup([item_id])

    warehouse.catalogue_path(tmp_path).unlink()  # the warehouse goes away
    assert await enricher.lookup([item_id]) == first


async def test_no_warehouse_means_no_attributes_not_a_failed_search(tmp_path: Path) -> None:
    assert await CatalogueEnricher(tmp_path / "nowhere").lookup(["1", "2"]) == {}
