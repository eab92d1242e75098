"""A service's rollout policy (Consul KV `meshserve/rollout/<service>`): which versions take traffic,
how the candidate's share is chosen per request, and the thresholds its analysis holds it to.

A document is JSON:
  {"stable": "1",
   "candidate": {"version": "2", "canary_percent": 10,
                 "ab": {"percent": 50, "salt": "exp-7"}, "shadow_percent": 100},
   "analysis": {"max_error_rate": 0.05, "max_p99_ratio": 1.5, "min_agreement": 0.8, "min_requests": 20}}
Once a policy exists, versions it does not name get no traffic. A sticky A/B split hashes the
caller's subject (metadata `x-meshserve-subject`, else the request's user or listing id), so a
subject sees the same arm on every gateway replica and after restarts.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from meshserve.errors import InvalidInput

ROLLOUT_PREFIX = "meshserve/rollout/"
# The services a policy can name: the photo-search stages and the listing models (registry meta `model`).
ROLLOUT_SERVICES = ("detector", "embedder", "counterfeit", "prohibited", "contact_info", "shipping")

STABLE, CANARY, AB_A, AB_B = "stable", "canary", "ab-a", "ab-b"
CANDIDATE_ARMS = (CANARY, AB_B)
MAX_VERSION_BYTES = 128


class RolloutPolicyError(InvalidInput):
    """A rollout document that does not validate; the message names the field."""


@dataclass(frozen=True)
class Analysis:
    """What the candidate must show each analysis interval to be stepped up (else it is rolled back)."""

    max_error_rate: float = 0.05  # candidate errors / requests, absolute
    max_error_rate_increase: float = 0.02  # … and at most this much above the stable's
    max_p99_ratio: float = 1.5  # candidate p99 / stable p99
    min_agreement: float = 0.5  # mean shadow agreement in [0, 1]
    min_requests: int = 20  # fewer candidate requests in an interval: no decision, wait


@dataclass(frozen=True)
class Candidate:
    version: str
    canary_percent: float = 0.0
    ab_percent: float = 0.0  # share of subjects on arm ab-b (the candidate); 0: no A/B
    ab_salt: str = ""
    shadow_percent: float = 0.0


@dataclass(frozen=True)
class RolloutPolicy:
    service: str
    stable: str
    candidate: Candidate | None = None
    analysis: Analysis = field(default_factory=Analysis)
    version: str = "candidate"  # the KV ModifyIndex of the document once in force

    def versions(self) -> tuple[str, ...]:
        return (self.stable,) + ((self.candidate.version,) if self.candidate else ())

    def describe(self) -> dict[str, Any]:
        return {"version": self.version, "stable": self.stable,
                "candidate": asdict(self.candidate) if self.candidate else None,
                "analysis": asdict(self.analysis)}  # fmt: skip

    def to_document(self) -> dict[str, Any]:
        """The JSON document this policy parses from (what `rollout` writes)."""
        doc: dict[str, Any] = {"stable": self.stable, "analysis": asdict(self.analysis)}
        if self.candidate is not None:
            c = self.candidate
            doc["candidate"] = {"version": c.version, "canary_percent": c.canary_percent,
                                "shadow_percent": c.shadow_percent}  # fmt: skip
            if c.ab_percent:
                doc["candidate"]["ab"] = {"percent": c.ab_percent, "salt": c.ab_salt}
        return doc


@dataclass(frozen=True)
class ArmChoice:
    """Where one request goes: the version answering, its arm, and a version to shadow (or None)."""

    version: str
    arm: str
    shadow: str | None = None


def choose_arm(policy: RolloutPolicy, subject: str, draw: float, shadow_draw: float) -> ArmChoice:
    """The arm of one request. `draw` and `shadow_draw` are uniform in [0, 1) (random per request)."""
    candidate = policy.candidate
    if candidate is None:
        return ArmChoice(policy.stable, STABLE)
    if candidate.ab_percent and subject:
        on_b = subject_bucket(policy.service, candidate.ab_salt, subject) < candidate.ab_percent / 100.0
        choice = ArmChoice(candidate.version, AB_B) if on_b else ArmChoice(policy.stable, AB_A)
    elif draw < candidate.canary_percent / 100.0:
        choice = ArmChoice(candidate.version, CANARY)
    else:
        choice = ArmChoice(policy.stable, STABLE)
    if choice.version == policy.stable and shadow_draw < candidate.shadow_percent / 100.0:
        return ArmChoice(choice.version, choice.arm, candidate.version)
    return choice


def subject_bucket(service: str, salt: str, subject: str) -> float:
    """A stable point in [0, 1) for a subject: the same on every process, run and machine."""
    digest = hashlib.sha256(f"{service}\x00{salt}\x00{subject}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


# -- parsing ------------------------------------------------------------------------------------


def rollout_key(service: str) -> str:
    if service not in ROLLOUT_SERVICES:
        raise RolloutPolicyError(f"unknown service {service!r} (known: {', '.join(ROLLOUT_SERVICES)})")
    return ROLLOUT_PREFIX + service


def parse_rollout(service: str, text: str | bytes, version: str = "candidate") -> RolloutPolicy:
    """The policy `text` makes for `service`; RolloutPolicyError naming the field otherwise."""
    rollout_key(service)
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RolloutPolicyError(f"not JSON: {exc}") from None
    obj = _object(doc, "document", {"stable", "candidate", "analysis"})
    stable = _version(obj.get("stable"), "stable")
    candidate = None
    if obj.get("candidate") is not None:
        c = _object(obj["candidate"], "candidate", {"version", "canary_percent", "ab", "shadow_percent"})
        cand_version = _version(c.get("version"), "candidate.version")
        if cand_version == stable:
            raise RolloutPolicyError(f"candidate.version: {cand_version!r} is the stable version")
        ab_percent, salt = 0.0, ""
        if c.get("ab") is not None:
            ab = _object(c["ab"], "candidate.ab", {"percent", "salt"})
            ab_percent = _percent(ab.get("percent", 50), "candidate.ab.percent")
            salt = ab.get("salt", "")
            if not isinstance(salt, str) or len(salt) > MAX_VERSION_BYTES:
                raise RolloutPolicyError(f"candidate.ab.salt: need a string of at most {MAX_VERSION_BYTES} bytes")
        candidate = Candidate(cand_version, _percent(c.get("canary_percent", 0), "candidate.canary_percent"),
                              ab_percent, salt, _percent(c.get("shadow_percent", 0), "candidate.shadow_percent"))
        if candidate.canary_percent and candidate.ab_percent:
            raise RolloutPolicyError("candidate: canary_percent and ab are exclusive (one split at a time)")
    analysis = Analysis()
    if obj.get("analysis") is not None:
        a = _object(obj["analysis"], "analysis", set(Analysis.__dataclass_fields__))
        given = {k: _fraction_or_ratio(k, v) for k, v in a.items()}
        analysis = Analysis(**given)  # type: ignore[arg-type]
    return RolloutPolicy(service, stable, candidate, analysis, version)


def _object(value: Any, where: str, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise RolloutPolicyError(f"{where}: need a JSON object, got {type(value).__name__}")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise RolloutPolicyError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(allowed))})")
    return value


def _version(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value or len(value.encode()) > MAX_VERSION_BYTES:
        raise RolloutPolicyError(f"{where}: need a non-empty version string of at most {MAX_VERSION_BYTES} bytes")
    return value


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RolloutPolicyError(f"{where}: need a finite number, got {value!r}")
    return float(value)


def _percent(value: Any, where: str) -> float:
    number = _number(value, where)
    if not 0.0 <= number <= 100.0:
        raise RolloutPolicyError(f"{where}: {number:g} is outside [0, 100]")
    return number


def _fraction_or_ratio(name: str, value: Any) -> float | int:
    where = f"analysis.{name}"
    number = _number(value, where)
    if name == "min_requests":
        if number != int(number) or not 1 <= number <= 1_000_000:
            raise RolloutPolicyError(f"{where}: need a whole number in [1, 1000000]")
        return int(number)
    if name == "max_p99_ratio":
        if not 1.0 <= number <= 100.0:
            raise RolloutPolicyError(f"{where}: {number:g} is outside [1, 100]")
        return number
    if not 0.0 <= number <= 1.0:
        raise RolloutPolicyError(f"{where}: {number:g} is outside [0, 1]")
    return number
