"""The dev agent's /v1/acl endpoints: bootstrap, policies and tokens, answered like Consul's."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

from meshserve.registry.dev.acl import ANONYMOUS_ID, READ, WRITE, AclStore
from meshserve.registry.dev.http import dumps
from meshserve.registry.dev.schema import BadRequest, parse_go_duration, pick_fields
from meshserve.registry.dev.state import NotFoundError

if TYPE_CHECKING:
    from meshserve.registry.dev.agent import DevAgent

_POLICY_FIELDS: dict[str, tuple[str, ...]] = {
    "ID": (), "Name": (), "Description": (), "Rules": (), "Datacenters": (), "Hash": (),
    "CreateIndex": (), "ModifyIndex": (), "Namespace": (), "Partition": ()}
_TOKEN_FIELDS: dict[str, tuple[str, ...]] = {
    "AccessorID": (), "SecretID": (), "Description": (), "Policies": (), "Roles": (), "ServiceIdentities": (),
    "NodeIdentities": (), "TemplatedPolicies": (), "Local": (), "ExpirationTime": (), "ExpirationTTL": (),
    "CreateTime": (), "Hash": (), "CreateIndex": (), "ModifyIndex": (), "Namespace": (), "Partition": ()}


def add_acl_routes(router: web.UrlDispatcher, agent: DevAgent) -> None:
    def store() -> AclStore:
        if not agent.acl.enabled:
            raise BadRequest("ACL support disabled", status=401)
        return agent.acl

    def caller_can(request: web.Request, want: int) -> bool:
        return agent.caller(request).can("acl", None, want)

    def require(request: web.Request, want: int) -> None:
        agent.caller(request).require("acl", None, want)

    async def answer(data: Any) -> web.Response:
        await agent.committed()
        return web.json_response(data, dumps=dumps)

    async def body(request: web.Request, known: dict[str, tuple[str, ...]]) -> dict[str, Any]:
        raw = await agent.body_json(request)
        return pick_fields(raw, known, "")

    async def bootstrap(request: web.Request) -> web.Response:
        acl = store()
        raw = await request.read()
        secret = None
        if raw.strip():
            fields = pick_fields(await agent.body_json(request), {"BootstrapSecret": ()}, "")
            secret = str(fields.get("BootstrapSecret") or "") or None
        return await answer(acl.token_json(acl.bootstrap(secret)))

    # ---- policies ------------------------------------------------------------------------------

    async def policy_create(request: web.Request) -> web.Response:
        acl = store()
        require(request, WRITE)
        return await answer(acl.put_policy(await body(request, _POLICY_FIELDS), None).to_json())

    async def policy_read(request: web.Request) -> web.Response:
        acl = store()
        require(request, READ)
        policy = acl.policies.get(request.match_info["id"])
        if policy is None:
            raise NotFoundError("ACL policy not found")
        return web.json_response(policy.to_json(), dumps=dumps)

    async def policy_read_name(request: web.Request) -> web.Response:
        acl = store()
        require(request, READ)
        policy = acl.policy_by_name(request.match_info["name"])
        if policy is None:
            raise NotFoundError("ACL policy not found")
        return web.json_response(policy.to_json(), dumps=dumps)

    async def policy_update(request: web.Request) -> web.Response:
        acl = store()
        require(request, WRITE)
        fields = await body(request, _POLICY_FIELDS)
        policy_id = request.match_info["id"]
        if fields.get("ID") and fields["ID"] != policy_id:
            raise BadRequest("Policy ID in URL and payload do not match")
        return await answer(acl.put_policy(fields, policy_id).to_json())

    async def policy_delete(request: web.Request) -> web.Response:
        acl = store()
        require(request, WRITE)
        acl.delete_policy(request.match_info["id"])
        return await answer(True)

    async def policy_list(request: web.Request) -> web.Response:
        acl = store()
        require(request, READ)
        return web.json_response([p.to_json(with_rules=False) for p in acl.policies.values()], dumps=dumps)

    # ---- tokens --------------------------------------------------------------------------------

    def ttl_of(fields: dict[str, Any]) -> float | None:
        if not fields.get("ExpirationTTL"):
            return None
        try:
            ttl = parse_go_duration(str(fields["ExpirationTTL"]))
        except ValueError:
            raise BadRequest(f"Invalid ExpirationTTL: {fields['ExpirationTTL']!r}") from None
        if not 60 <= ttl <= 24 * 3600:
            raise BadRequest(f"Token Expiration TTL '{fields['ExpirationTTL']}' should be between 1m0s and 24h0m0s")
        return ttl

    async def token_create(request: web.Request) -> web.Response:
        acl = store()
        require(request, WRITE)
        fields = await body(request, _TOKEN_FIELDS)
        return await answer(acl.token_json(acl.put_token(fields, None, ttl_of(fields))))

    async def token_self(request: web.Request) -> web.Response:
        acl = store()
        caller = agent.caller(request)  # an unknown token: 403 ACL not found
        return web.json_response(acl.token_json(acl.tokens[caller.accessor_id]), dumps=dumps)

    async def token_read(request: web.Request) -> web.Response:
        acl = store()
        require(request, READ)
        token = acl.tokens.get(request.match_info["id"])
        if token is None:
            raise NotFoundError("ACL token not found")
        return web.json_response(acl.token_json(token, caller_can(request, WRITE)), dumps=dumps)

    async def token_update(request: web.Request) -> web.Response:
        acl = store()
        require(request, WRITE)
        fields = await body(request, _TOKEN_FIELDS)
        accessor = request.match_info["id"]
        if fields.get("AccessorID") and fields["AccessorID"] != accessor:
            raise BadRequest("Token AccessorID in URL and payload do not match")
        return await answer(acl.token_json(acl.put_token(fields, accessor, None)))

    async def token_delete(request: web.Request) -> web.Response:
        acl = store()
        require(request, WRITE)
        acl.delete_token(request.match_info["id"])
        return await answer(True)

    async def token_list(request: web.Request) -> web.Response:
        acl = store()
        require(request, READ)
        show = caller_can(request, WRITE)
        policy = request.query.get("policy", "")
        tokens = [t for t in acl.tokens.values() if not policy or policy in t.policy_ids]
        tokens.sort(key=lambda t: (t.accessor_id != ANONYMOUS_ID, t.create_index))
        return web.json_response([acl.token_json(t, show) for t in tokens], dumps=dumps)

    router.add_put("/v1/acl/bootstrap", bootstrap)
    router.add_put("/v1/acl/policy", policy_create)
    router.add_get("/v1/acl/policy/name/{name}", policy_read_name)
    router.add_get("/v1/acl/policy/{id}", policy_read)
    router.add_put("/v1/acl/policy/{id}", policy_update)
    router.add_delete("/v1/acl/policy/{id}", policy_delete)
    router.add_get("/v1/acl/policies", policy_list)
    router.add_put("/v1/acl/token", token_create)
    router.add_get("/v1/acl/token/self", token_self)
    router.add_get("/v1/acl/token/{id}", token_read)
    router.add_put("/v1/acl/token/{id}", token_update)
    router.add_delete("/v1/acl/token/{id}", token_delete)
    router.add_get("/v1/acl/tokens", token_list)
