"""Asynchronous jobs: the worker that runs them through the gateway, and the `jobs` commands."""
