"""The Consul-HTTP-API-compatible dev agent: `meshserve registry dev`, like `consul agent -dev`.

The subset of Consul's API it implements is described in docs/architecture.md.
"""
