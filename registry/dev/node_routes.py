"""The dev agent's answers about its one node: GET /v1/agent/members, /v1/catalog/datacenters,
/v1/catalog/nodes, /v1/catalog/node/<node>, /v1/health/node/<node> and /v1/health/state/<state>,
shaped like a single-server Consul's (the last three block like its other reads)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from aiohttp import web

from meshserve.registry.dev import render
from meshserve.registry.dev.acl import READ
from meshserve.registry.dev.http import filter_param
from meshserve.registry.dev.schema import BadRequest
from meshserve.registry.dev.server_info import agent_self_json
from meshserve.registry.dev.state import CHECKS_TOPIC

if TYPE_CHECKING:
    from meshserve.registry.dev.agent import DevAgent
    from meshserve.registry.dev.state import CheckState


def add_node_routes(router: web.UrlDispatcher, agent: DevAgent) -> None:
    async def members(request: web.Request) -> web.Response:
        # (the LAN pool: this server alone; ?wan=1 lists the same one member as Consul's WAN pool)
        agent.require_read(request)
        member = agent_self_json(agent.state, agent.acl.enabled)["Member"]
        return web.json_response([member])

    async def datacenters(request: web.Request) -> web.Response:
        return web.json_response([agent.state.node.datacenter])

    async def nodes(request: web.Request) -> web.Response:
        readable = agent.sees_node(agent.caller(request))
        index = await agent.block_catalog(request)
        node = render.node_json(agent.state.node)
        return agent.indexed([node] if readable else [], index, filtered=not readable)

    async def node(request: web.Request) -> web.Response:
        caller = agent.caller(request)
        readable = agent.sees_node(caller)
        index = await agent.block_catalog(request)
        state = agent.state
        if request.match_info["node"] != state.node.name:
            return agent.indexed(None, index, status=200, body_null=True)
        every = (state.consul, *state.services.values())
        services = {svc.definition.service_id: render.agent_service_json(svc, state.node.datacenter)
                    for svc in every if readable and caller.can("service", svc.definition.name, READ)}  # fmt: skip
        answer = {"Node": render.node_json(state.node), "Services": services}
        return agent.indexed(answer, index, filtered=len(services) < len(every))

    async def checks_where(request: web.Request, keep: Callable[[CheckState], bool]) -> web.Response:
        caller = agent.caller(request)
        match = filter_param(request)
        state = agent.state
        index = await agent.block(request, state.checks_index, (CHECKS_TOPIC,))
        out = []
        hidden = False
        for check in state.checks.values():
            if not keep(check):
                continue
            if not agent.sees_check(caller, check):
                hidden = True
                continue
            item = render.check_json(check, state.node, state.services)
            if match(item):
                out.append(item)
        return agent.indexed(out, index, filtered=hidden)

    async def node_health(request: web.Request) -> web.Response:
        here = request.match_info["node"] == agent.state.node.name
        return await checks_where(request, lambda check: here)

    async def by_state(request: web.Request) -> web.Response:
        wanted = request.match_info["state"]
        if wanted not in ("any", "passing", "warning", "critical"):
            raise BadRequest(f"Invalid state: {wanted}")
        return await checks_where(request, lambda check: wanted in ("any", check.status))

    router.add_get("/v1/catalog/node/{node}", node)
    router.add_get("/v1/health/node/{node}", node_health)
    router.add_get("/v1/health/state/{state}", by_state)
    router.add_get("/v1/agent/members", members)
    router.add_get("/v1/catalog/datacenters", datacenters)
    router.add_get("/v1/catalog/nodes", nodes)
