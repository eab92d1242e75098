"""Unit tests of the dev agent's `?filter=` subset of go-bexpr."""

from __future__ import annotations

import pytest

from meshserve.registry.dev.filter import compile_filter
from meshserve.registry.dev.schema import BadRequest

ITEM = {
    "Service": {"ID": "e-1", "Service": "embedder", "Tags": ["v7", "canary"], "Port": 50051,
                "Meta": {"shard": "3", "version": "7"}, "EnableTagOverride": False},
    "Checks": [{"CheckID": "serfHealth", "Status": "passing"},
               {"CheckID": "service:e-1", "Status": "critical"}],
}


@pytest.mark.parametrize("expr, expected", [
    ('Service.Meta.shard == "3"', True),
    ("Service.Meta.shard == 3", True),
    ('Service.Meta.shard != "3"', False),
    ('Service.Meta["version"] == "7"', True),
    ('"canary" in Service.Tags', True),
    ('"stable" not in Service.Tags', True),
    ("Service.Tags contains v7", True),
    ("Service.Meta contains shard", True),
    ("Service.Meta.missing is empty", True),
    ("Service.Tags is not empty", True),
    ("Service.Port == 50051 and Service.EnableTagOverride == false", True),
    ('Service.ID matches "^e-[0-9]+$"', True),
    ('Service.ID not matches "^x"', True),
    ('not (Service.Meta.shard == "3") or Service.Service == embedder', True),
    ('Service.Meta.shard == "4" or (Service.Port == 1 and Service.ID == "e-1")', False),
    ('Checks.Status contains "critical"', True),
    ('"passing" in Checks.Status', True),
])
def test_expressions(expr: str, expected: bool) -> None:
    assert compile_filter(expr)(ITEM) is expected


@pytest.mark.parametrize("expr", ["", "Service.Port ==", "== 3", "(Service.Port == 1",
                                  "Service.Port = 1", 'Service.ID matches "("', "a == 1 b",
                                  "(" * 5000])
def test_bad_expressions_are_400(expr: str) -> None:
    with pytest.raises(BadRequest, match="Failed to create boolean expression evaluator"):
        compile_filter(expr)
