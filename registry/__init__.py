"""The Consul client side: registration, health queries, blocking-query watches and the keeper.

The Consul-compatible dev agent (`meshserve registry dev`) lives in `registry/dev/`.
"""
