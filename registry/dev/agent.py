"""The dev agent's HTTP transport: Consul's routes, status codes, headers and ACL, over DevState."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from meshserve.registry.dev import persist, render
from meshserve.registry.dev.acl import READ, WRITE, AclStore, Caller
from meshserve.registry.dev.acl_routes import add_acl_routes
from meshserve.registry.dev.http import (
    blocking_params,
    bool_param,
    dumps,
    filter_param,
    index_headers,
    keys_view,
    reject_constant,
    required_bool,
    text_response,
    too_large,
    uint_param,
)
from meshserve.registry.dev.node_routes import add_node_routes
from meshserve.registry.dev.notify import block_until_changed
from meshserve.registry.dev.schema import (
    KV_VALUE_MAX,
    BadRequest,
    CheckDef,
    parse_check,
    parse_service,
)
from meshserve.registry.dev.server_info import agent_self_json, leader_addr
from meshserve.registry.dev.state import (
    CATALOG_TOPIC,
    DevState,
    NotFoundError,
    ServerError,
)

log = logging.getLogger(__name__)

MAX_BODY = 1024 * 1024  # request bodies larger than this get 413
MAX_IN_FLIGHT = 8192  # requests (mostly parked blocking queries) before 429
HEALTH_CACHE_SIZE = 512  # rendered /v1/health/service answers kept (keyed by index)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class AgentConfig:
    """How `meshserve registry dev` runs; built once from the command line."""

    host: str = "127.0.0.1"
    port: int = 8500
    acl_token: str | None = None  # the initial management token; given, it turns ACLs on
    acl_enabled: bool = False
    acl_default_policy: str = "deny"
    http_enabled: bool = True  # plain HTTP on host:port (off: HTTPS only, like Consul's ports.http = -1)
    https_addr: tuple[str, int] | None = None  # Consul's addresses.https + ports.https
    # Consul's tls.defaults: the HTTPS listener's certificate and the CA its clients must come from; the
    # same CA, certificate and key are what the agent presents to and verifies of TLS gRPC check targets
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    verify_incoming: bool = False  # HTTPS clients must present a certificate signed by ca_file
    data_dir: Path | None = None
    node_name: str = ""
    datacenter: str = "dc1"
    reap_interval: float = 30.0  # Consul's reaper period
    min_deregister_after: float = 60.0  # Consul's minimum DeregisterCriticalServiceAfter
    min_check_interval: float = 1.0  # Consul's minimum check interval


class DevAgent:
    """Routes of the Consul subset listed in docs/architecture.md, answering from one DevState."""

    def __init__(self, config: AgentConfig, state: DevState,
                 persister: persist.Persister | None = None, acl: AclStore | None = None):
        self.config = config
        self.state = state
        self.acl = acl if acl is not None else AclStore()
        self.persister = persister
        self.in_flight = 0
        self._health_cache: dict[tuple[Any, ...], tuple[bytes, bool]] = {}

    # ---- plumbing ------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._middleware])
        r = app.router
        r.add_get("/v1/status/leader", self.status_leader)
        r.add_get("/v1/status/peers", self.status_peers)
        r.add_get("/v1/agent/self", self.agent_self)
        r.add_put("/v1/agent/service/register", self.service_register)
        r.add_put("/v1/agent/service/deregister/{id:.+}", self.service_deregister)
        r.add_put("/v1/agent/service/maintenance/{id:.+}", self.service_maintenance)
        r.add_get("/v1/agent/service/{id:.+}", self.agent_service)
        r.add_get("/v1/agent/services", self.agent_services)
        r.add_get("/v1/agent/checks", self.agent_checks)
        r.add_put("/v1/agent/check/register", self.check_register)
        r.add_put("/v1/agent/check/deregister/{id:.+}", self.check_deregister)
        r.add_put("/v1/agent/check/{verb:pass|warn|fail}/{id:.+}", self.check_ttl)
        r.add_put("/v1/agent/check/update/{id:.+}", self.check_update)
        r.add_put("/v1/agent/maintenance", self.node_maintenance)
        r.add_get("/v1/health/service/{name:.+}", self.health_service)
        r.add_get("/v1/health/checks/{name:.+}", self.health_checks)
        r.add_get("/v1/catalog/services", self.catalog_services)
        r.add_get("/v1/catalog/service/{name:.+}", self.catalog_service)
        add_node_routes(r, self)
        add_acl_routes(r, self)
        r.add_get("/v1/kv/{key:.*}", self.kv_get)
        r.add_put("/v1/kv/{key:.*}", self.kv_put)
        r.add_delete("/v1/kv/{key:.*}", self.kv_delete)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self.in_flight >= MAX_IN_FLIGHT:
            return text_response(429, f"Too many requests in flight ({MAX_IN_FLIGHT}); retry later")
        self.in_flight += 1
        try:
            self._check_dc(request)
            return await handler(request)
        except BadRequest as exc:
            return text_response(exc.status, str(exc))
        except NotFoundError as exc:
            return text_response(404, str(exc))
        except ServerError as exc:
            return text_response(500, str(exc))
        except web.HTTPRequestEntityTooLarge:
            return text_response(413, f"Request body too large, max size: {MAX_BODY} bytes")
        except web.HTTPException as exc:
            if exc.status >= 400 and not exc.text:
                return text_response(exc.status, exc.reason)
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:
            log.exception("internal error answering %s %s", request.method, request.path_qs)
            return text_response(500, "Internal error in the meshserve dev agent (see its log)")
        finally:
            self.in_flight -= 1

    def _check_dc(self, request: web.Request) -> None:
        dc = request.query.get("dc")
        if dc and dc != self.config.datacenter:
            raise ServerError("No path to datacenter")

    def _token(self, request: web.Request) -> str:
        token = request.headers.get("X-Consul-Token") or request.query.get("token", "")
        auth = request.headers.get("Authorization", "")
        if not token and auth.lower().startswith("bearer "):
            token = auth[7:].strip()
        return token

    def caller(self, request: web.Request) -> Caller:
        """Who the request's token is; an unknown token is refused outright (403 ACL not found)."""
        return self.acl.resolve(self._token(request))

    def _require(self, request: web.Request, resource: str, name: str, want: int) -> None:
        self.caller(request).require(resource, name, want)

    def require_read(self, request: web.Request) -> None:
        """(for node_routes) agent:read on this node."""
        self._require(request, "agent", self.state.node.name, READ)

    def sees_node(self, caller: Caller) -> bool:
        return caller.can("node", self.state.node.name, READ)

    def sees_service(self, caller: Caller, name: str) -> bool:
        """Health and catalog entries need service:read on the service and node:read on its node."""
        return caller.can("service", name, READ) and self.sees_node(caller)

    def sees_check(self, caller: Caller, check: Any) -> bool:
        svc = self.state.services.get(check.service_id) if check.service_id else None
        if svc is not None:
            return caller.can("service", svc.definition.name, READ) and self.sees_node(caller)
        return self.sees_node(caller)

    async def committed(self) -> None:
        await self._committed()

    async def body_json(self, request: web.Request) -> Any:
        return await self._body_json(request)

    def indexed(self, data: Any, index: int, filtered: bool = False, status: int = 200,
                body_null: bool = False) -> web.Response:  # fmt: skip
        if body_null:  # Consul's JSON null (an unknown node), with the index headers
            resp = web.Response(text="null", content_type="application/json", status=status)
            index_headers(resp, index)
            return resp
        return self._indexed(data, index, filtered, status)

    async def block_catalog(self, request: web.Request) -> int:
        return await self._block(request, lambda: self.state.catalog_services()[0], topics=(CATALOG_TOPIC,))

    async def block(self, request: web.Request, index_of: Callable[[], int], topics: tuple[Hashable, ...]) -> int:
        return await self._block(request, index_of, topics)

    def _with_min_interval(self, check: CheckDef) -> CheckDef:
        """Consul raises intervals below its minimum (and says so in its log)."""
        floor = self.config.min_check_interval
        if check.kind in ("http", "grpc", "tcp") and check.interval < floor:
            log.warning("check %s has interval below minimum of %ss; using the minimum",
                        check.check_id, floor)
            return dataclasses.replace(check, interval=floor)
        return check

    def _known_service(self, request: web.Request, service_id: str) -> Any:
        self.caller(request)  # an unknown token is refused before anything else
        svc = self.state.services.get(service_id)
        if svc is None:
            raise NotFoundError(f'Unknown service ID "{service_id}"')
        return svc

    def _require_check_write(self, request: web.Request, check_id: str) -> None:
        self.caller(request)
        check = self.state.checks.get(check_id)
        if check is None:
            raise NotFoundError(f'Unknown check ID "{check_id}". Ensure that the check ID is '
                                "passed, not the check name.")
        if check.service_id:
            svc = self.state.services.get(check.service_id)
            name = svc.definition.name if svc else check.service_id
            self._require(request, "service", name, WRITE)
        else:
            self._require(request, "node", self.state.node.name, WRITE)

    def _indexed_body(self, body: bytes, index: int) -> web.Response:
        resp = web.Response(body=body, content_type="application/json")
        index_headers(resp, index)
        return resp

    def _indexed(self, data: Any, index: int, filtered: bool = False,
                 status: int = 200) -> web.Response:
        if data is None:  # Consul's KV 404: no body, but the index headers all the same
            resp = web.Response(status=status)
        else:
            resp = web.json_response(data, status=status, dumps=dumps)
        index_headers(resp, index)
        if filtered:
            resp.headers["X-Consul-Results-Filtered-By-ACLs"] = "true"
        return resp

    async def _body_json(self, request: web.Request) -> Any:
        body = await request.read()
        if not body.strip():
            raise BadRequest("Request decode failed: EOF")
        try:
            return json.loads(body, parse_constant=reject_constant)
        except (ValueError, RecursionError) as exc:
            raise BadRequest(f"Request decode failed: {exc}") from None

    async def _committed(self) -> None:
        """Acknowledged writes are on disk before the answer, when persisting."""
        if self.persister is not None:
            try:
                await self.persister.flush()
            except TimeoutError:
                raise ServerError(
                    "the change is made but could not be saved to the data dir (see the agent log)"
                ) from None

    async def _block(self, request: web.Request, index_of: Callable[[], int],
                     topics: tuple[Hashable, ...] = (),
                     kv_prefix: Callable[[], str | None] | None = None) -> int:
        min_index, wait = blocking_params(request)
        return await block_until_changed(self.state.notifier, index_of, min_index, wait,
                                         topics, kv_prefix)

    # ---- status and agent ----------------------------------------------------------------------

    async def status_leader(self, request: web.Request) -> web.Response:
        return web.json_response(leader_addr(self.state.node))

    async def status_peers(self, request: web.Request) -> web.Response:
        return web.json_response([leader_addr(self.state.node)])

    async def agent_self(self, request: web.Request) -> web.Response:
        self._require(request, "agent", self.state.node.name, READ)
        return web.json_response(agent_self_json(self.state, self.acl.enabled))

    async def service_register(self, request: web.Request) -> web.Response:
        body = await self._body_json(request)
        service, checks = parse_service(body)
        checks = [self._with_min_interval(c) for c in checks]
        self._require(request, "service", service.name, WRITE)
        # Consul's own rule: present and "" or "true"; anything else means no.
        replace = request.query.get("replace-existing-checks", None) in ("", "true")
        self.state.register_service(service, checks, replace_existing_checks=replace)
        await self._committed()
        return web.Response(status=200)

    async def service_deregister(self, request: web.Request) -> web.Response:
        service_id = request.match_info["id"]
        svc = self._known_service(request, service_id)
        self._require(request, "service", svc.definition.name, WRITE)
        self.state.deregister_service(service_id)
        await self._committed()
        return web.Response(status=200)

    async def service_maintenance(self, request: web.Request) -> web.Response:
        service_id = request.match_info["id"]
        enable = required_bool(request, "enable")
        svc = self._known_service(request, service_id)
        self._require(request, "service", svc.definition.name, WRITE)
        self.state.service_maintenance(service_id, enable, request.query.get("reason", ""))
        await self._committed()
        return web.Response(status=200)

    async def node_maintenance(self, request: web.Request) -> web.Response:
        enable = required_bool(request, "enable")
        self._require(request, "node", self.state.node.name, WRITE)
        self.state.node_maintenance(enable, request.query.get("reason", ""))
        await self._committed()
        return web.Response(status=200)

    async def agent_service(self, request: web.Request) -> web.Response:
        service_id = request.match_info["id"]
        svc = self.state.services.get(service_id)
        caller = self.caller(request)
        if svc is not None:
            caller.require("service", svc.definition.name, READ)
        if svc is None:
            raise NotFoundError(f"unknown service ID: {service_id}")
        return web.json_response(render.agent_service_json(svc, self.state.node.datacenter))

    async def agent_services(self, request: web.Request) -> web.Response:
        caller = self.caller(request)
        match = filter_param(request)
        out = {}
        hidden = False
        for sid, svc in self.state.services.items():
            if not caller.can("service", svc.definition.name, READ):
                hidden = True
                continue
            item = render.agent_service_json(svc, self.state.node.datacenter)
            if match(item):
                out[sid] = item
        resp = web.json_response(out)
        if hidden:
            resp.headers["X-Consul-Results-Filtered-By-ACLs"] = "true"
        return resp

    async def agent_checks(self, request: web.Request) -> web.Response:
        caller = self.caller(request)
        match = filter_param(request)
        out = {}
        hidden = False
        for cid, check in self.state.checks.items():
            if not self.sees_check(caller, check):
                hidden = True
                continue
            item = render.check_json(check, self.state.node, self.state.services, indexes=False)
            if match(item):
                out[cid] = item
        resp = web.json_response(out)
        if hidden:
            resp.headers["X-Consul-Results-Filtered-By-ACLs"] = "true"
        return resp

    async def check_register(self, request: web.Request) -> web.Response:
        body = await self._body_json(request)
        check = self._with_min_interval(parse_check(body, ""))
        if not check.name:
            raise BadRequest("Missing check name")
        self._require(request, "node", self.state.node.name, WRITE)
        self.state.register_check(check)
        await self._committed()
        return web.Response(status=200)

    async def check_deregister(self, request: web.Request) -> web.Response:
        self._require(request, "node", self.state.node.name, WRITE)
        self.state.deregister_check(request.match_info["id"])
        await self._committed()
        return web.Response(status=200)

    async def check_ttl(self, request: web.Request) -> web.Response:
        status = {"pass": "passing", "warn": "warning", "fail": "critical"}[
            request.match_info["verb"]]
        check_id = request.match_info["id"]
        self._require_check_write(request, check_id)
        note = request.query.get("note", "")
        if len(note) > 64 * 1024:
            raise BadRequest("note is longer than 65536 characters")
        self.state.update_ttl(check_id, status, note)
        return web.Response(status=200)

    async def check_update(self, request: web.Request) -> web.Response:
        from meshserve.registry.dev.schema import as_str, pick_fields

        body = pick_fields(await self._body_json(request), {"Status": (), "Output": ()}, "")
        status = as_str(body.get("Status"), "Status")
        if status not in ("passing", "warning", "critical"):
            raise BadRequest(f"Invalid check status: '{status}'")
        check_id = request.match_info["id"]
        self._require_check_write(request, check_id)
        self.state.update_ttl(check_id, status, as_str(body.get("Output"), "Output", 1 << 20))
        return web.Response(status=200)

    # ---- health and catalog --------------------------------------------------------------------

    async def health_service(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        readable = self.sees_service(self.caller(request), name)
        passing = bool_param(request, "passing")
        tags = tuple(t.lower() for t in request.query.getall("tag", []))
        expr = request.query.get("filter", "")
        match = filter_param(request)
        index = await self._block(request, lambda: self.state.health_index(name),
                                  topics=(("svc", name),))
        # Many watchers of one service wake together on one change: render that answer once.
        key = (name, index, passing, tags, expr)
        cached = self._health_cache.get(key)
        if cached is None:
            _, entries = self.state.health(name)
            node, services = self.state.node, self.state.services
            out = []
            for entry in entries:
                if passing and any(c.status != "passing" for c in entry.checks):
                    continue
                own_tags = {t.lower() for t in entry.service.definition.tags}
                if any(t not in own_tags for t in tags):
                    continue
                item = render.health_entry_json(entry, node, services)
                if match(item):
                    out.append(item)
            if len(self._health_cache) >= HEALTH_CACHE_SIZE:
                self._health_cache.clear()
            cached = self._health_cache[key] = (dumps(out).encode(), bool(out))
        body, nonempty = cached
        if not readable:
            return self._indexed([], index, filtered=nonempty)
        return self._indexed_body(body, index)

    async def health_checks(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        readable = self.sees_service(self.caller(request), name)
        match = filter_param(request)
        index = await self._block(request, lambda: self.state.health_index(name),
                                  topics=(("svc", name),))
        out = []
        for entry in self.state.health(name)[1]:
            for check in entry.checks:
                if check.service_id:
                    item = render.check_json(check, self.state.node, self.state.services)
                    if match(item):
                        out.append(item)
        if not readable:
            return self._indexed([], index, filtered=bool(out))
        return self._indexed(out, index)

    async def catalog_services(self, request: web.Request) -> web.Response:
        caller = self.caller(request)
        await self._block(request, lambda: self.state.catalog_services()[0],
                          topics=(CATALOG_TOPIC,))
        index, services = self.state.catalog_services()
        shown = {name: tags for name, tags in services.items() if caller.can("service", name, READ)}
        return self._indexed(shown, index, filtered=len(shown) < len(services))

    async def catalog_service(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        readable = self.sees_service(self.caller(request), name)
        tags = [t.lower() for t in request.query.getall("tag", [])]
        match = filter_param(request)
        index = await self._block(request, lambda: self.state.health_index(name),
                                  topics=(("svc", name),))
        out = []
        for entry in self.state.health(name)[1]:
            own_tags = {t.lower() for t in entry.service.definition.tags}
            if any(t not in own_tags for t in tags):
                continue
            item = render.catalog_service_json(entry.service, self.state.node)
            if match(item):
                out.append(item)
        if not readable:
            return self._indexed([], index, filtered=bool(out))
        return self._indexed(out, index)

    # ---- KV ------------------------------------------------------------------------------------

    async def kv_get(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        query = request.query
        caller = self.caller(request)
        if "keys" in query or "recurse" in query:
            await self._block(request, lambda: self.state.kv_list(key)[0], kv_prefix=lambda: key)
            index, entries = self.state.kv_list(key)
            shown = [e for e in entries if caller.can("key", e.key, READ)]
            filtered = len(shown) < len(entries)
            entries = shown
            if "keys" in query:
                keys = keys_view(key, [e.key for e in entries], query.get("separator", ""))
                if not keys:
                    return self._indexed(None, index, filtered, status=404)
                return self._indexed(keys, index, filtered)
            if not entries:
                return self._indexed(None, index, filtered, status=404)
            return self._indexed([render.kv_json(e) for e in entries], index, filtered)
        caller.require("key", key, READ)
        await self._block(request, lambda: self.state.kv_get(key)[0],
                          kv_prefix=lambda: key if key in self.state.kv else "")
        index, entry = self.state.kv_get(key)
        if entry is None:
            return self._indexed(None, index, status=404)
        if "raw" in query:
            resp = web.Response(body=entry.value or b"", content_type="text/plain")
            index_headers(resp, index)
            return resp
        return self._indexed([render.kv_json(entry)], index)

    async def kv_put(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        if not key:
            raise BadRequest("Missing key name")
        if "acquire" in request.query or "release" in request.query:
            raise BadRequest("Sessions (acquire/release) are not supported by the meshserve dev agent")
        flags = uint_param(request, "flags", "Invalid flags")
        cas = uint_param(request, "cas", "Invalid cas index")
        self._require(request, "key", key, WRITE)
        if request.content_length is not None and request.content_length > KV_VALUE_MAX:
            raise BadRequest(too_large(request.content_length), status=413)
        value = await request.read()
        if len(value) > KV_VALUE_MAX:
            raise BadRequest(too_large(len(value)), status=413)
        ok = self.state.kv_put(key, value or None, flags, cas)
        await self._committed()
        return web.json_response(ok)

    async def kv_delete(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        recurse = "recurse" in request.query
        if not key and not recurse:
            raise BadRequest("Missing key name")
        cas = uint_param(request, "cas", "Invalid cas index")
        if recurse:
            self.caller(request).require_prefix_write("key", key)
        else:
            self._require(request, "key", key, WRITE)
        ok = self.state.kv_delete(key, recurse, cas)
        await self._committed()
        return web.json_response(ok)
