"""The flows' policy documents (Consul KV `meshserve/config/<flow>`): their shape, defaults and validation.

A document is JSON. Anything it leaves out keeps the built-in default; anything it gets wrong
(wrong type, a threshold outside [0, 1], review above block, an unknown model or key) refuses
the whole document with a message naming the field, so an operator's typo never half-applies.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from meshserve.errors import InvalidInput

CONFIG_PREFIX = "meshserve/config/"
LISTING_GUARD = "listing-guard"
PHOTO_SEARCH = "photo-search"

# The violation classifiers the guard knows, as their servers register them (meta `model`).
# Same names as meshserve.inference.vocabulary.VIOLATIONS (the gateway may not import that
# layer; tests/unit/test_flow_policy.py keeps the two equal).
CLASSIFIERS = ("counterfeit", "prohibited", "contact_info")
SHIPPING = "shipping"
DETECTOR = "detector"
GUARD_MODELS = (*CLASSIFIERS, SHIPPING, DETECTOR)

FAIL_OPEN = "fail-open"
FAIL_CLOSED = "fail-closed"
MAX_TIMEOUT_MS = 60_000.0
MAX_TOP_K = 20


class PolicyError(InvalidInput):
    """A policy document that does not validate; the message names the field and what is wrong."""


@dataclass(frozen=True)
class ModelPolicy:
    """How the guard treats one model. Thresholds matter for the classifiers only."""

    enabled: bool = True
    review_threshold: float = 0.5
    block_threshold: float = 0.9
    timeout_ms: float = 250.0
    # What a verdict that did not come (TIMEOUT, UNAVAILABLE, ERROR) means for the decision:
    # fail-open ignores it, fail-closed sends the listing to review.
    missing: str = FAIL_OPEN


@dataclass(frozen=True)
class GuardPolicy:
    models: Mapping[str, ModelPolicy] = field(default_factory=lambda: {m: ModelPolicy() for m in GUARD_MODELS})
    top_k: int = 3  # category suggestions from the detector's labels
    version: str = "default"  # "default", or the KV ModifyIndex of the document

    def model(self, name: str) -> ModelPolicy:
        return self.models[name]

    def enabled(self) -> tuple[str, ...]:
        return tuple(m for m in GUARD_MODELS if self.models[m].enabled)

    def describe(self) -> dict[str, Any]:
        return {"version": self.version, "top_k": self.top_k,
                "models": {name: asdict(p) for name, p in self.models.items()}}  # fmt: skip


@dataclass(frozen=True)
class PhotoSearchDefaults:
    top_k: int = 10
    min_detection_score: float = 0.3
    version: str = "default"

    def describe(self) -> dict[str, Any]:
        return asdict(self)


# -- validation -------------------------------------------------------------------------------


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PolicyError(f"{where}: must be a JSON object, got {type(value).__name__}")
    return value


def _known(doc: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(doc) - set(allowed))
    if unknown:
        raise PolicyError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(allowed)})")


def _number(value: Any, where: str, lo: float, hi: float, *, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PolicyError(f"{where}: must be a number, got {json.dumps(value)}")
    if value < lo or value > hi or (lo_open and value == lo):
        bracket = "(" if lo_open else "["
        raise PolicyError(f"{where}: {value:g} is outside {bracket}{lo:g}, {hi:g}]")
    return float(value)


def _integer(value: Any, where: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PolicyError(f"{where}: must be an integer, got {json.dumps(value)}")
    if not lo <= value <= hi:
        raise PolicyError(f"{where}: {value} is outside [{lo}, {hi}]")
    return value


def _model_policy(doc: Any, where: str, base: ModelPolicy) -> ModelPolicy:
    doc = _object(doc, where)
    _known(doc, tuple(f for f in asdict(base)), where)
    changes: dict[str, Any] = {}
    if "enabled" in doc:
        if not isinstance(doc["enabled"], bool):
            raise PolicyError(f"{where}.enabled: must be true or false, got {json.dumps(doc['enabled'])}")
        changes["enabled"] = doc["enabled"]
    for name in ("review_threshold", "block_threshold"):
        if name in doc:
            changes[name] = _number(doc[name], f"{where}.{name}", 0.0, 1.0)
    if "timeout_ms" in doc:
        changes["timeout_ms"] = _number(doc["timeout_ms"], f"{where}.timeout_ms", 0.0, MAX_TIMEOUT_MS, lo_open=True)
    if "missing" in doc:
        if doc["missing"] not in (FAIL_OPEN, FAIL_CLOSED):
            raise PolicyError(f"{where}.missing: must be {FAIL_OPEN!r} or {FAIL_CLOSED!r}, "
                              f"got {json.dumps(doc['missing'])}")  # fmt: skip
        changes["missing"] = doc["missing"]
    policy = replace(base, **changes)
    if policy.review_threshold > policy.block_threshold:
        raise PolicyError(f"{where}: review_threshold {policy.review_threshold:g} is above "
                          f"block_threshold {policy.block_threshold:g}")  # fmt: skip
    return policy


def _load(text: str | bytes, flow: str) -> dict[str, Any]:
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PolicyError(f"{flow}: not valid JSON: {exc}") from None
    return _object(doc, flow)


def parse_guard_policy(text: str | bytes, version: str = "default",
                       base: GuardPolicy | None = None) -> GuardPolicy:  # fmt: skip
    """A listing-guard document over `base` (the built-in defaults); PolicyError if invalid."""
    base = base or GuardPolicy()
    doc = _load(text, LISTING_GUARD)
    _known(doc, ("models", "top_k"), LISTING_GUARD)
    models = dict(base.models)
    for name, model_doc in _object(doc.get("models", {}), "models").items():
        if name not in GUARD_MODELS:
            raise PolicyError(f"models: unknown model {name!r} (known: {', '.join(GUARD_MODELS)})")
        models[name] = _model_policy(model_doc, f"models.{name}", base.models[name])
    top_k = _integer(doc["top_k"], "top_k", 1, MAX_TOP_K) if "top_k" in doc else base.top_k
    return GuardPolicy(models=models, top_k=top_k, version=version)


def parse_photo_defaults(text: str | bytes, version: str = "default",
                         base: PhotoSearchDefaults | None = None) -> PhotoSearchDefaults:  # fmt: skip
    base = base or PhotoSearchDefaults()
    doc = _load(text, PHOTO_SEARCH)
    _known(doc, ("top_k", "min_detection_score"), PHOTO_SEARCH)
    top_k = _integer(doc["top_k"], "top_k", 1, 100) if "top_k" in doc else base.top_k
    score = (_number(doc["min_detection_score"], "min_detection_score", 0.0, 1.0, lo_open=True)
             if "min_detection_score" in doc else base.min_detection_score)  # fmt: skip
    return PhotoSearchDefaults(top_k=top_k, min_detection_score=score, version=version)


# flow → (parse(text, version) → policy, built-in default)
FLOWS: dict[str, tuple[Callable[[str | bytes, str], Any], Any]] = {
    LISTING_GUARD: (parse_guard_policy, GuardPolicy()),
    PHOTO_SEARCH: (parse_photo_defaults, PhotoSearchDefaults()),
}


def flow_key(flow: str) -> str:
    if flow not in FLOWS:
        raise InvalidInput(f"unknown flow {flow!r} (known: {', '.join(FLOWS)})")
    return CONFIG_PREFIX + flow


def validate(flow: str, text: str | bytes) -> Any:
    """The policy `text` makes for `flow`; PolicyError (naming the field) if it does not validate."""
    flow_key(flow)
    parse, _ = FLOWS[flow]
    return parse(text, "candidate")
