"""The dev agent's answers about its one node: GET /v1/agent/members, /v1/catalog/datacenters and
/v1/catalog/nodes, shaped like a single-server Consul's."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from meshserve.registry.dev import render
from meshserve.registry.dev.server_info import agent_self_json

if TYPE_CHECKING:
    from meshserve.registry.dev.agent import DevAgent


def add_node_routes(router: web.UrlDispatcher, agent: DevAgent) -> None:
    async def members(request: web.Request) -> web.Response:
        # (the LAN pool: this server alone; ?wan=1 lists the same one member as Consul's WAN pool)
        agent.require_read(request)
        member = agent_self_json(agent.state, agent.config.acl_token is not None)["Member"]
        return web.json_response([member])

    async def datacenters(request: web.Request) -> web.Response:
        return web.json_response([agent.state.node.datacenter])

    async def nodes(request: web.Request) -> web.Response:
        readable = agent.readable(request)
        index = await agent.block_catalog(request)
        node = render.node_json(agent.state.node)
        return agent.indexed([node] if readable else [], index, filtered=not readable)

    router.add_get("/v1/agent/members", members)
    router.add_get("/v1/catalog/datacenters", datacenters)
    router.add_get("/v1/catalog/nodes", nodes)
