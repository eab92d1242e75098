"""The gateway: discovery, balancing, resilience and the product flows."""
