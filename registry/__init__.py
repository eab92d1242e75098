"""Consul registration, discovery watches, and the Consul-compatible dev agent."""
