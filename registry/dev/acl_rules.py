"""Consul ACL rules (the HCL subset policies use, or their JSON form) and what a set of them allows."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

DENY, READ, WRITE = 0, 1, 2
LEVELS = {"deny": DENY, "read": READ, "write": WRITE, "list": READ}
LEVEL_NAMES = {DENY: "deny", READ: "read", WRITE: "write"}
# Resources whose rules name a segment: `service "web" { policy = "write" }` and `service_prefix`.
SEGMENTED = ("service", "key", "node", "agent", "session", "event", "query")
# Resources with one disposition for everything: `acl = "read"`.
UNSEGMENTED = ("acl", "operator", "keyring", "mesh", "peering")
# Keys a segmented rule's block may hold besides `policy` (accepted, not enforced here).
EXTRA_BLOCK_KEYS = ("intentions",)


class RulesError(ValueError):
    """Rules text that is neither the HCL subset nor its JSON form."""


@dataclass
class Rules:
    """Merged rules: per resource, exact and prefix segments → level; unsegmented → level."""

    exact: dict[str, dict[str, int]] = field(default_factory=dict)
    prefix: dict[str, dict[str, int]] = field(default_factory=dict)
    flat: dict[str, int] = field(default_factory=dict)

    def add(self, resource: str, segment: str | None, level: int, is_prefix: bool) -> None:
        if segment is None:
            self.flat[resource] = _merge(self.flat.get(resource), level)
            return
        table = (self.prefix if is_prefix else self.exact).setdefault(resource, {})
        table[segment] = _merge(table.get(segment), level)

    def merge(self, other: Rules) -> None:
        for resource, table in other.exact.items():
            for segment, level in table.items():
                self.add(resource, segment, level, False)
        for resource, table in other.prefix.items():
            for segment, level in table.items():
                self.add(resource, segment, level, True)
        for resource, level in other.flat.items():
            self.add(resource, None, level, False)

    def level(self, resource: str, name: str | None, default: int) -> int:
        """The most specific rule wins: an exact rule, else the longest matching prefix."""
        if name is None:
            return self.flat.get(resource, default)
        exact = self.exact.get(resource, {})
        if name in exact:
            return exact[name]
        best: str | None = None
        for segment in self.prefix.get(resource, {}):
            if name.startswith(segment) and (best is None or len(segment) > len(best)):
                best = segment
        return self.prefix[resource][best] if best is not None else default


def _merge(old: int | None, new: int) -> int:
    """Two policies with a rule for the same segment: deny wins, then write over read."""
    if old is None:
        return new
    if DENY in (old, new):
        return DENY
    return max(old, new)


def parse_rules(text: str) -> Rules:
    """Parse a policy's Rules: HCL (`service "web" { policy = "write" }`) or the same as JSON."""
    stripped = text.strip()
    if not stripped:
        return Rules()
    if stripped.startswith("{"):
        try:
            doc = json.loads(stripped)
        except ValueError as exc:
            raise RulesError(f"invalid JSON rules: {exc}") from None
        return _from_tree(doc)
    return _from_tree(_parse_hcl(stripped))


def _level(value: Any, where: str) -> int:
    if not isinstance(value, str) or value not in LEVELS:
        raise RulesError(f'Invalid rule policy for {where}: "{value}" (use "read", "write" or "deny")')
    return LEVELS[value]


def _from_tree(doc: Any) -> Rules:
    if not isinstance(doc, dict):
        raise RulesError("rules must be an object of resources")
    rules = Rules()
    for key, body in doc.items():
        resource, is_prefix = (key[:-7], True) if key.endswith("_prefix") else (key, False)
        if resource in UNSEGMENTED and not is_prefix:
            rules.add(resource, None, _level(body, key), False)
            continue
        if resource not in SEGMENTED:
            raise RulesError(f"Unknown ACL resource {key!r}")
        if not isinstance(body, dict):
            raise RulesError(f"{key} rules must name a segment: {key} \"<name>\" {{ policy = ... }}")
        for segment, block in body.items():
            if isinstance(block, list):  # HCL's JSON form may wrap a block in a list
                block = block[0] if len(block) == 1 else block
            if not isinstance(block, dict) or "policy" not in block:
                raise RulesError(f'{key} "{segment}" needs policy = "read"|"write"|"deny"')
            extra = set(block) - {"policy", *EXTRA_BLOCK_KEYS}
            if extra:
                raise RulesError(f'{key} "{segment}": unknown key {sorted(extra)[0]!r}')
            if key == "key_prefix" or block["policy"] != "list":
                rules.add(resource, str(segment), _level(block["policy"], f'{key} "{segment}"'), is_prefix)
            else:
                raise RulesError(f'{key} "{segment}": "list" is only valid for key_prefix')
    return rules


_TOKEN = re.compile(r'\s+|#[^\n]*|//[^\n]*|/\*.*?\*/|"(?:[^"\\]|\\.)*"|[A-Za-z_][A-Za-z0-9_-]*|[{}=]|.',
                    re.DOTALL)


def _tokens(text: str) -> list[tuple[str, int]]:
    out = []
    for m in _TOKEN.finditer(text):
        tok = m.group()
        if tok[0].isspace() or tok.startswith(("#", "//", "/*")):
            continue
        if tok[0] not in '"{}=' and not (tok[0].isalpha() or tok[0] == "_"):
            raise RulesError(f"unexpected {tok!r} at line {text.count(chr(10), 0, m.start()) + 1}")
        out.append((tok, text.count("\n", 0, m.start()) + 1))
    return out


def _string(tok: str) -> str:
    return json.loads(tok)  # HCL strings escape like JSON for what rules use


def _parse_hcl(text: str) -> dict[str, Any]:
    """The HCL Consul rules use: `res "seg" { k = "v" ... }` blocks and `res = "v"` attributes."""
    toks = _tokens(text)
    pos = 0

    def take(expect: str | None = None) -> tuple[str, int]:
        nonlocal pos
        if pos >= len(toks):
            raise RulesError("unexpected end of rules" + (f", expected {expect!r}" if expect else ""))
        tok = toks[pos]
        pos += 1
        if expect is not None and tok[0] != expect:
            raise RulesError(f"line {tok[1]}: expected {expect!r}, got {tok[0]!r}")
        return tok

    doc: dict[str, Any] = {}
    while pos < len(toks):
        name, line = take()
        if not (name[0].isalpha() or name[0] == "_"):
            raise RulesError(f"line {line}: expected a resource name, got {name!r}")
        nxt, line = take()
        if nxt == "=":
            value, line = take()
            if not value.startswith('"'):
                raise RulesError(f"line {line}: expected a quoted value after {name} =")
            doc[name] = _string(value)
            continue
        if not nxt.startswith('"'):
            raise RulesError(f'line {line}: expected {name} "<name>" {{ ... }} or {name} = "<policy>"')
        segment = _string(nxt)
        take("{")
        block: dict[str, str] = {}
        while True:
            key, line = take()
            if key == "}":
                break
            take("=")
            value, line = take()
            if not value.startswith('"'):
                raise RulesError(f"line {line}: expected a quoted value after {key} =")
            block[key] = _string(value)
        doc.setdefault(name, {})[segment] = block
    return doc
