"""The route table's choices: newest complete embedder version, missing shards kept, deregistered
shards dropped, nothing emptied while the registry is away."""

from __future__ import annotations

import asyncio
from types import MappingProxyType

from meshserve.gateway.discovery import Registered, registered_from_health, worst_status
from meshserve.gateway.policy import default_policies
from meshserve.gateway.routes import RouteTable
from meshserve.registry.config import RegistryConfig
from meshserve.registry.instances import Instance

_port = iter(range(20000, 30000))


def replica(role: str, passing: bool = True, **meta: str) -> Registered:
    port = next(_port)
    instance = Instance(id=f"{role}-{port}", name=f"meshserve-{role}", address="127.0.0.1", port=port,
                        meta=MappingProxyType({"role": role, **meta}))  # fmt: skip
    return Registered(instance, passing, "passing" if passing else "critical")


def table() -> RouteTable:
    return RouteTable(RegistryConfig("http://127.0.0.1:1"), default_policies())


async def test_search_route_uses_the_newest_complete_embedder_version() -> None:
    routes = table()
    routes._apply("detector", (replica("detector", version="d1"),))
    routes._apply("embedder", (replica("embedder", version="e1"), replica("embedder", version="e2")))
    routes._apply("indexer", (
        replica("indexer", embedder_version="e1", shard="a", index="catalogue"),
        replica("indexer", embedder_version="e1", shard="b", index="catalogue"),
        replica("indexer", embedder_version="e2", shard="a", index="catalogue"),
        replica("indexer", False, embedder_version="e2", shard="b", index="catalogue"),
    ))  # fmt: skip
    route = routes.search_route()
    assert route is not None and route.embedder_version == "e1"  # e2's shard b has no passing replica

    # e2's shard b comes up: e2 is complete and newer, so it goes live
    routes._apply("indexer", (
        replica("indexer", embedder_version="e1", shard="a", index="catalogue"),
        replica("indexer", embedder_version="e1", shard="b", index="catalogue"),
        replica("indexer", embedder_version="e2", shard="a", index="catalogue"),
        replica("indexer", embedder_version="e2", shard="b", index="catalogue"),
    ))  # fmt: skip
    route = routes.search_route()
    assert route is not None and route.embedder_version == "e2" and route.index == "catalogue"
    assert [s.shard for s in route.shards] == ["a", "b"]
    await routes.close()


async def test_a_shard_without_passing_replica_is_expected_but_missing_and_a_deregistered_one_is_gone() -> None:
    routes = table()
    routes._apply("detector", (replica("detector", version="d1"),))
    routes._apply("embedder", (replica("embedder", version="e1"),))
    alive = replica("indexer", embedder_version="e1", shard="a")
    routes._apply("indexer", (alive, replica("indexer", embedder_version="e1", shard="b")))
    routes._apply("indexer", (alive, replica("indexer", False, embedder_version="e1", shard="b")))
    route = routes.search_route()
    assert route is not None and route.embedder_version == "e1"  # the live version does not flip away
    assert {s.shard: len(s.replicas) for s in route.shards} == {"a": 1, "b": 0}

    routes._apply("indexer", (alive,))  # b deregistered: gone on purpose
    route = routes.search_route()
    assert route is not None and [s.shard for s in route.shards] == ["a"]
    await routes.close()


async def test_no_route_without_detector_or_embedder() -> None:
    routes = table()
    routes._apply("indexer", (replica("indexer", embedder_version="e1", shard="a"),))
    assert routes.search_route() is None
    routes._apply("detector", (replica("detector", version="d1"),))
    assert routes.search_route() is None
    routes._apply("embedder", (replica("embedder", False, version="e1"),))
    assert routes.search_route() is None
    await routes.close()


def test_passing_follows_consuls_rule_every_check_exactly_passing() -> None:
    assert worst_status([{"Status": "passing"}, {"Status": "passing"}]) == "passing"
    assert worst_status([{"Status": "passing"}, {"Status": "warning"}]) == "warning"
    assert worst_status([{"Status": "warning"}, {"Status": "critical"}]) == "critical"
    entries = [{"Node": {"Address": "10.0.0.1"}, "Service": {"ID": "x", "Service": "s", "Port": 1, "Address": ""},
                "Checks": [{"Status": "passing"}, {"Status": "warning"}]}]  # fmt: skip
    [r] = registered_from_health(entries)
    assert not r.passing and r.status == "warning" and r.instance.address == "10.0.0.1"


def test_versions_order_numbers_as_numbers_and_never_fail_on_mixed_kinds() -> None:
    from meshserve.gateway.routes import _version_key

    assert sorted(["20261126-170512", "20261126-90000", "2.10", "2.9", "emb-x"], key=_version_key) == [
        "2.9", "2.10", "20261126-90000", "20261126-170512", "emb-x"]


async def test_readiness_follows_the_route_table() -> None:
    routes = table()
    told: list[bool] = []
    routes.watch_readiness(told.append)
    routes._apply("detector", (replica("detector", version="d1"),))
    routes._apply("embedder", (replica("embedder", version="e1"),))
    assert told == [False] and not routes.can_search()  # no shard yet
    routes._apply("indexer", (replica("indexer", embedder_version="e1", shard="a"),
                              replica("indexer", False, embedder_version="e1", shard="b")))  # fmt: skip
    assert told == [False]  # shard b expected but not passing: incomplete
    routes._apply("indexer", (replica("indexer", embedder_version="e1", shard="a"),
                              replica("indexer", embedder_version="e1", shard="b")))  # fmt: skip
    assert told == [False, True] and routes.can_search()
    routes._apply("embedder", ())
    assert told == [False, True, False]
    await routes.close()


async def test_an_all_critical_answer_just_after_an_outage_is_held_then_applied(monkeypatch) -> None:
    from meshserve.gateway import outage_hold

    monkeypatch.setattr(outage_hold, "SETTLE_AFTER_OUTAGE_S", 0.3)
    routes = table()
    detector, embedder = replica("detector", version="d1"), replica("embedder", version="e1")
    routes._apply("detector", (detector,))
    routes._apply("embedder", (embedder,))
    routes._apply("indexer", (replica("indexer", embedder_version="e1", shard="a"),))
    assert routes.can_search()

    critical = (Registered(detector.instance, False, "critical"),)
    routes._apply("detector", critical, stale=True)  # the registry goes away …
    routes._apply("detector", critical)  # … and comes back with the checks it ran while cut off
    assert routes.can_search()  # held: the last known detector still routes

    routes._apply("detector", (detector,))  # its check passes again: applied at once
    routes._apply("detector", critical)  # a real failure inside the window is held too …
    assert routes.can_search()
    routes._watches.clear()
    await asyncio.sleep(0.4)
    routes._apply("detector", critical)  # … but not past it
    assert not routes.can_search()
    await routes.close()


async def test_an_all_critical_answer_without_an_outage_empties_the_stage() -> None:
    routes = table()
    detector = replica("detector", version="d1")
    routes._apply("detector", (detector,))
    routes._apply("detector", (Registered(detector.instance, False, "critical"),))
    assert routes.newest("detector") is None
    await routes.close()


async def test_the_listing_routes_hold_an_all_critical_answer_just_after_an_outage(monkeypatch) -> None:
    """The guard's routes to the classifiers and the shipping estimator settle like the search's: the
    registry's first all-critical answer after an outage does not take every classifier away."""
    from meshserve.gateway import outage_hold
    from meshserve.gateway.listing_routes import ListingRoutes

    monkeypatch.setattr(outage_hold, "SETTLE_AFTER_OUTAGE_S", 0.3)
    routes = ListingRoutes(RegistryConfig("http://127.0.0.1:1"), default_policies())
    counterfeit = replica("classifier", model="counterfeit", version="c1")
    shipping = replica("shipping", model="shipping-size", version="s1")
    routes._apply("classifier", (counterfeit,))
    routes._apply("shipping", (shipping,))
    critical = (Registered(counterfeit.instance, False, "critical"),)

    routes._apply("classifier", critical)  # no outage: a real failure empties the route at once
    assert routes.route("counterfeit") is None
    routes._apply("classifier", (counterfeit,))
    routes._apply("classifier", critical, stale=True)  # the registry goes away …
    assert routes.route("counterfeit") is not None  # … and the routes stay as they were
    routes._apply("classifier", critical)  # back, with the checks it ran while cut off: held
    route = routes.route("counterfeit")
    assert route is not None and route.version == "c1" and routes.route("shipping") is not None
    await asyncio.sleep(0.4)
    routes._apply("classifier", critical)  # past the settling time the answer stands
    assert routes.route("counterfeit") is None and routes.route("shipping") is not None
    await routes.close()
