"""Model inference: networks, configs and loaders, what training writes and servers load; no training code."""
