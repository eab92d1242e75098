"""A classifier server whose model answers garbage, for the guard's fault tests: the real model-server
runtime and registration, with a model that returns a NaN score (`nan`) or a score of the wrong shape
(`shape`). Run: python -m tests.integration.garbage_classifier MODE NAME VERSION PORT CONSUL_ADDR."""

from __future__ import annotations

import asyncio
import sys

import numpy as np

from meshserve.registry.config import RegistryConfig
from meshserve.servers.model import Model
from meshserve.servers.server import ModelServer, ServerConfig
from meshserve.wire.signature import Arrays, Params
from meshserve.wire.signatures import classifier_signature


class GarbageClassifier(Model):
    role = "classifier"

    def __init__(self, mode: str, name: str, version: str):
        self.mode, self.name, self.version = mode, name, version
        self.signature = classifier_signature(0.5)

    def load(self) -> None:
        pass

    def predict(self, inputs: Arrays, params: Params) -> Arrays:
        n = len(inputs["title"])
        if self.mode == "nan":
            return {"score": np.full(n, np.nan, np.float32), "flagged": np.zeros(n, bool)}
        return {"score": np.zeros((n, 2), np.float32), "flagged": np.zeros(n, bool)}


def main(mode: str, name: str, version: str, port: str, consul: str) -> int:
    config = ServerConfig(service_name="meshserve-classifier", port=int(port), check_interval_s=0.5,
                          registry=RegistryConfig.from_env(http_addr=consul), grace_s=1.0)  # fmt: skip
    return asyncio.run(ModelServer(GarbageClassifier(mode, name, version), config).run())


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
