"""meshserve: a gRPC model-serving mesh with Consul discovery."""

__version__ = "0.1.0"
