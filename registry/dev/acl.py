"""The dev agent's ACL state like Consul's: policies, tokens, bootstrap, and who a request's token is."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from meshserve.registry.dev.acl_rules import DENY, READ, WRITE, Rules, RulesError, parse_rules
from meshserve.registry.dev.schema import BadRequest

GLOBAL_MANAGEMENT_ID = "00000000-0000-0000-0000-000000000001"
GLOBAL_MANAGEMENT_NAME = "global-management"
ANONYMOUS_ID = "00000000-0000-0000-0000-000000000002"
ANONYMOUS_SECRET = "anonymous"
_POLICY_NAME = re.compile(r"^[A-Za-z0-9\-_]{1,128}$")
_MANAGEMENT_RULES = 'acl = "write"\nagent_prefix "" { policy = "write" }\nkey_prefix "" { policy = "write" }\n' \
    'node_prefix "" { policy = "write" }\nservice_prefix "" { policy = "write" }\noperator = "write"\n'


def permission_denied(who: str, permission: str, resource: str | None) -> BadRequest:
    """Consul's 403 wording: who lacks which permission on what (unnamed for acl, operator …)."""
    on = f' on "{resource}"' if resource is not None else ""
    return BadRequest(f"Permission denied: {who} lacks permission '{permission}'{on}", status=403)


def acl_not_found() -> BadRequest:
    return BadRequest("ACL not found", status=403)


def _now_rfc3339(stamp: float) -> str:
    return datetime.fromtimestamp(stamp, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _hash(*parts: str) -> str:
    return base64.b64encode(hashlib.blake2b("\x00".join(parts).encode(), digest_size=32).digest()).decode()


@dataclass
class Policy:
    policy_id: str
    name: str
    description: str
    rules_text: str
    rules: Rules
    create_index: int
    modify_index: int

    def to_json(self, with_rules: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {"ID": self.policy_id, "Name": self.name, "Description": self.description}
        if with_rules:
            out["Rules"] = self.rules_text
        out.update({"Hash": _hash(self.name, self.description, self.rules_text),
                    "CreateIndex": self.create_index, "ModifyIndex": self.modify_index})
        return out


@dataclass
class Token:
    accessor_id: str
    secret_id: str
    description: str
    policy_ids: list[str]
    create_time: float
    create_index: int
    modify_index: int
    local: bool = False
    expiration_time: float | None = None

    def expired(self, now: float) -> bool:
        return self.expiration_time is not None and now >= self.expiration_time


@dataclass(frozen=True)
class Caller:
    """What one request's token may do (`management` may do anything)."""

    accessor_id: str
    anonymous: bool
    management: bool
    rules: Rules
    default_level: int
    enabled: bool = True

    def level(self, resource: str, name: str | None) -> int:
        if not self.enabled or self.management:
            return WRITE
        return self.rules.level(resource, name, self.default_level)

    def can(self, resource: str, name: str | None, want: int) -> bool:
        return self.level(resource, name) >= want

    def require(self, resource: str, name: str | None, want: int) -> None:
        if not self.can(resource, name, want):
            permission = f"{resource}:{'write' if want == WRITE else 'read'}"
            raise permission_denied(self.who(), permission, name)

    def require_prefix_write(self, resource: str, prefix: str) -> None:
        """A recursive delete: write on the prefix, and no rule below it that forbids writing."""
        self.require(resource, prefix, WRITE)
        if not self.enabled or self.management:
            return
        below = [*self.rules.exact.get(resource, {}).items(), *self.rules.prefix.get(resource, {}).items()]
        for segment, level in below:
            if segment.startswith(prefix) and level < WRITE:
                raise permission_denied(self.who(), f"{resource}:write", segment)

    def who(self) -> str:
        return "anonymous token" if self.anonymous else f"token with AccessorID '{self.accessor_id}'"


OPEN = Caller(accessor_id="", anonymous=True, management=True, rules=Rules(), default_level=WRITE, enabled=False)


@dataclass
class AclStore:
    """Policies and tokens; `resolve` turns a request's secret into a Caller."""

    enabled: bool = False
    default_policy: str = "deny"
    initial_management: str | None = None
    bump: Callable[[], int] = lambda: 1
    on_change: Callable[[], None] = lambda: None
    policies: dict[str, Policy] = field(default_factory=dict)
    tokens: dict[str, Token] = field(default_factory=dict)
    bootstrap_index: int = 0  # the index of the bootstrap (0: not bootstrapped yet)

    def __post_init__(self) -> None:
        self._ensure_builtins()

    def _ensure_builtins(self) -> None:
        if GLOBAL_MANAGEMENT_ID not in self.policies:
            self.policies[GLOBAL_MANAGEMENT_ID] = Policy(
                GLOBAL_MANAGEMENT_ID, GLOBAL_MANAGEMENT_NAME, "Builtin Policy that grants unlimited access",
                _MANAGEMENT_RULES, parse_rules(_MANAGEMENT_RULES), 1, 1)
        if ANONYMOUS_ID not in self.tokens:
            self.tokens[ANONYMOUS_ID] = Token(ANONYMOUS_ID, ANONYMOUS_SECRET, "Anonymous Token", [], time.time(), 1, 1)
        if self.initial_management and self._by_secret(self.initial_management) is None:
            # Consul's initial management token: configured, so the cluster counts as bootstrapped.
            accessor = str(uuid.uuid5(uuid.NAMESPACE_URL, "meshserve-initial-management:" + self.initial_management))
            idx = self.bump()
            self.tokens[accessor] = Token(accessor, self.initial_management, "Initial Management Token",
                                          [GLOBAL_MANAGEMENT_ID], time.time(), idx, idx)
            self.bootstrap_index = self.bootstrap_index or idx

    # ---- who is calling ------------------------------------------------------------------------

    def _by_secret(self, secret: str) -> Token | None:
        for token in self.tokens.values():
            if hmac.compare_digest(token.secret_id.encode(), secret.encode()):
                return token
        return None

    def resolve(self, secret: str) -> Caller:
        """The Caller for a request's token; an unknown or expired token is 403 ACL not found."""
        if not self.enabled:
            return OPEN
        token = self._by_secret(secret or ANONYMOUS_SECRET)
        if token is None or token.expired(time.time()):
            raise acl_not_found()
        rules = Rules()
        management = False
        for policy_id in token.policy_ids:
            policy = self.policies.get(policy_id)
            if policy is None:
                continue  # a deleted policy no longer grants anything
            management = management or policy_id == GLOBAL_MANAGEMENT_ID
            rules.merge(policy.rules)
        default = WRITE if self.default_policy == "allow" else DENY
        return Caller(token.accessor_id, token.accessor_id == ANONYMOUS_ID, management, rules, default)

    # ---- policies ------------------------------------------------------------------------------

    def policy_by_name(self, name: str) -> Policy | None:
        return next((p for p in self.policies.values() if p.name == name), None)

    def put_policy(self, body: dict[str, Any], policy_id: str | None) -> Policy:
        name = str(body.get("Name") or "")
        if not _POLICY_NAME.match(name):
            raise BadRequest("Invalid Policy: invalid Name. Only alphanumeric characters, '-' and '_' are allowed")
        same_name = self.policy_by_name(name)
        if same_name is not None and same_name.policy_id != policy_id:
            raise BadRequest(f'Invalid Policy: A Policy with Name "{name}" already exists')
        rules_text = str(body.get("Rules") or "")
        try:
            rules = parse_rules(rules_text)
        except RulesError as exc:
            raise BadRequest(f"Invalid Policy: failed to parse rules: {exc}") from None
        idx = self.bump()
        if policy_id is None:
            policy = Policy(str(uuid.uuid4()), name, str(body.get("Description") or ""), rules_text, rules, idx, idx)
        else:
            old = self.policies.get(policy_id)
            if old is None:
                raise BadRequest(f"Cannot find policy {policy_id}")
            if policy_id == GLOBAL_MANAGEMENT_ID and (rules_text != old.rules_text or name != old.name):
                raise BadRequest("Changing the Rules or Name for the builtin global-management policy is not permitted")
            policy = Policy(policy_id, name, str(body.get("Description") or ""), rules_text, rules,
                            old.create_index, idx)
        self.policies[policy.policy_id] = policy
        self.on_change()
        return policy

    def delete_policy(self, policy_id: str) -> None:
        if policy_id == GLOBAL_MANAGEMENT_ID:
            raise BadRequest("Delete operation not permitted on the builtin global-management policy")
        if self.policies.pop(policy_id, None) is not None:
            self.bump()
            self.on_change()

    # ---- tokens --------------------------------------------------------------------------------

    def _policy_links(self, links: Any) -> list[str]:
        if links is None:
            return []
        if not isinstance(links, list):
            raise BadRequest("Request decode failed: Policies must be a list of {ID} or {Name}")
        ids = []
        for link in links:
            link = {str(k).lower(): v for k, v in link.items()} if isinstance(link, dict) else {}
            if link.get("id"):
                if link["id"] not in self.policies:
                    raise BadRequest(f"cannot find policy {link['id']}")
                ids.append(str(link["id"]))
            elif link.get("name"):
                policy = self.policy_by_name(str(link["name"]))
                if policy is None:
                    raise BadRequest(f"cannot find policy {link['name']}")
                ids.append(policy.policy_id)
            else:
                raise BadRequest("Policy links must name an ID or a Name")
        return list(dict.fromkeys(ids))

    def put_token(self, body: dict[str, Any], accessor_id: str | None, ttl_s: float | None) -> Token:
        policy_ids = self._policy_links(body.get("Policies"))
        idx = self.bump()
        if accessor_id is None:  # create
            accessor = str(body.get("AccessorID") or uuid.uuid4())
            secret = str(body.get("SecretID") or uuid.uuid4())
            if accessor in self.tokens:
                raise BadRequest("Invalid Token: AccessorID is already in use")
            if self._by_secret(secret) is not None:
                raise BadRequest("Invalid Token: SecretID is already in use")
            now = time.time()
            token = Token(accessor, secret, str(body.get("Description") or ""), policy_ids, now, idx, idx,
                          bool(body.get("Local")), now + ttl_s if ttl_s else None)
        else:
            old = self.tokens.get(accessor_id)
            if old is None:
                raise BadRequest(f"Cannot find token {accessor_id!r}")
            if body.get("SecretID") and body["SecretID"] != old.secret_id:
                raise BadRequest("Cannot change a token's SecretID")
            token = Token(old.accessor_id, old.secret_id, str(body.get("Description") or old.description),
                          policy_ids, old.create_time, old.create_index, idx, old.local, old.expiration_time)
        self.tokens[token.accessor_id] = token
        self.on_change()
        return token

    def delete_token(self, accessor_id: str) -> None:
        if accessor_id == ANONYMOUS_ID:
            raise BadRequest("Delete operation not permitted on the anonymous token")
        if self.tokens.pop(accessor_id, None) is not None:
            self.bump()
            self.on_change()

    def bootstrap(self, secret: str | None) -> Token:
        if self.bootstrap_index:
            raise BadRequest("Permission denied: ACL bootstrap no longer allowed "
                             f"(reset index: {self.bootstrap_index})", status=403)
        token = self.put_token({"Description": "Bootstrap Token (Global Management)",
                                "SecretID": secret or None, "Policies": [{"ID": GLOBAL_MANAGEMENT_ID}]}, None, None)
        self.bootstrap_index = token.create_index
        self.on_change()
        return token

    def token_json(self, token: Token, show_secret: bool = True) -> dict[str, Any]:
        policies = [{"ID": pid, "Name": self.policies[pid].name} for pid in token.policy_ids if pid in self.policies]
        out: dict[str, Any] = {"AccessorID": token.accessor_id,
                               "SecretID": token.secret_id if show_secret else "<hidden>",
                               "Description": token.description}
        if policies:
            out["Policies"] = policies
        out["Local"] = token.local
        if token.expiration_time is not None:
            out["ExpirationTime"] = _now_rfc3339(token.expiration_time)
        out.update({"CreateTime": _now_rfc3339(token.create_time),
                    "Hash": _hash(token.description, *token.policy_ids),
                    "CreateIndex": token.create_index, "ModifyIndex": token.modify_index})
        return out

    # ---- persistence ---------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {
            "bootstrap_index": self.bootstrap_index,
            "policies": [{"id": p.policy_id, "name": p.name, "description": p.description, "rules": p.rules_text,
                          "create": p.create_index, "modify": p.modify_index}
                         for p in self.policies.values() if p.policy_id != GLOBAL_MANAGEMENT_ID],
            "tokens": [{"accessor": t.accessor_id, "secret": t.secret_id, "description": t.description,
                        "policies": t.policy_ids, "created": t.create_time, "create": t.create_index,
                        "modify": t.modify_index, "local": t.local, "expires": t.expiration_time}
                       for t in self.tokens.values()],
        }

    def restore(self, data: dict[str, Any]) -> None:
        self.bootstrap_index = int(data.get("bootstrap_index", 0))
        for raw in data.get("policies", []):
            self.policies[raw["id"]] = Policy(raw["id"], raw["name"], raw["description"], raw["rules"],
                                              parse_rules(raw["rules"]), int(raw["create"]), int(raw["modify"]))
        for raw in data.get("tokens", []):
            self.tokens[raw["accessor"]] = Token(
                raw["accessor"], raw["secret"], raw["description"], list(raw["policies"]), float(raw["created"]),
                int(raw["create"]), int(raw["modify"]), bool(raw["local"]), raw.get("expires"))
        self._ensure_builtins()


__all__ = ["READ", "WRITE", "AclStore", "Caller", "OPEN", "permission_denied"]
