"""The listing guard's mesh as real processes: dev registry, three classifiers, the shipping estimator,
the detector and the gateway, plus helpers to call Check and to change the policy in KV."""

from __future__ import annotations

import json
import shutil
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshserve.v1 import listing_guard_pb2, listing_guard_pb2_grpc
from tests.support import DevAgent, ManagedProcess, Spawner, free_port, meshserve_argv, wait_serving, wait_until

CLASSIFIERS = ("counterfeit", "prohibited", "contact_info")
POLICY_KEY = "meshserve/config/listing-guard"
LISTING_GUARD = "meshserve.v1.ListingGuard"


@dataclass
class GuardMesh:
    spawn: Spawner
    home: Path
    agent: DevAgent
    gateway_target: str = ""
    metrics_port: int = 0
    trace_file: Path | None = None
    models: dict[str, ManagedProcess] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        return {"MESHSERVE_HOME": str(self.home), "CONSUL_HTTP_ADDR": self.agent.http_addr}

    def serve(self, kind: str, *args: str, name: str = "") -> tuple[ManagedProcess, str]:
        port = free_port()
        proc = self.spawn(meshserve_argv("serve", kind, "--port", str(port), "--check-interval", "0.5",
                                         "--grace", "1", *args), name=name or kind, env=self.env())  # fmt: skip
        target = f"127.0.0.1:{port}"
        wait_serving(target, proc, timeout=120)
        return proc, target

    def start_models(self) -> None:
        for name in CLASSIFIERS:
            self.models[name], _ = self.serve("classifier", "--model", name, name=name)
        self.models["shipping"], _ = self.serve("shipping")
        self.models["detector"], _ = self.serve("detector")

    def start_gateway(self) -> None:
        port, self.metrics_port = free_port(), free_port()
        self.trace_file = self.spawn.log_dir / "gateway-traces.jsonl"
        proc = self.spawn(meshserve_argv("gateway", "--port", str(port), "--no-register", "--metrics-port",
                                         str(self.metrics_port), "--grace", "1", "--trace-file", str(self.trace_file)),
                          name="gateway", env=self.env())  # fmt: skip
        self.gateway_target = f"127.0.0.1:{port}"
        wait_serving(self.gateway_target, proc, timeout=60)
        self.models["gateway"] = proc

    def classifier_copy(self, name: str, version_suffix: str, tmp: Path) -> Path:
        """A copy of classifier `name` whose card says a newer version (same weights)."""
        from meshserve.inference.classifiers import resolve_classifier_dir

        source = resolve_classifier_dir(name, self.home)
        target = tmp / f"{name}-{version_suffix}"
        shutil.copytree(source, target)
        card = json.loads((target / "card.json").read_text())
        card["version"] = f"{card['version']}-{version_suffix}"
        (target / "card.json").write_text(json.dumps(card))
        return target

    # -- calls ---------------------------------------------------------------------------------

    def check(self, request: listing_guard_pb2.CheckRequest, timeout: float = 10.0) -> listing_guard_pb2.CheckResponse:
        with grpc.insecure_channel(self.gateway_target) as channel:
            return listing_guard_pb2_grpc.ListingGuardStub(channel).Check(request, timeout=timeout)

    def refused(self, request: listing_guard_pb2.CheckRequest, timeout: float = 10.0) -> grpc.RpcError:
        try:
            self.check(request, timeout)
        except grpc.RpcError as exc:
            return exc
        raise AssertionError("Check answered, expected an error")

    def guard_health(self) -> int:
        with grpc.insecure_channel(self.gateway_target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=LISTING_GUARD),
                                                              timeout=2)
        return reply.status

    def spans(self, trace_id: str) -> list[dict[str, Any]]:
        assert self.trace_file is not None
        if not self.trace_file.is_file():
            return []
        found = []
        for line in self.trace_file.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line being written right now
            if record.get("trace_id") == trace_id:
                found.append(record)
        return found

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as resp:
            return resp.read().decode()

    # -- policy --------------------------------------------------------------------------------

    def put_policy(self, doc: dict[str, Any] | str) -> int:
        """Write the listing-guard document; return its ModifyIndex (the policy version)."""
        client = self.agent.client()
        text = doc if isinstance(doc, str) else json.dumps(doc)
        assert client.kv.put(POLICY_KEY, text)
        _, item = client.kv.get(POLICY_KEY)
        return int(item["ModifyIndex"])

    def delete_policy(self) -> None:
        self.agent.client().kv.delete(POLICY_KEY)

    def wait_policy(self, version: str, request: listing_guard_pb2.CheckRequest,
                    timeout: float = 10.0) -> listing_guard_pb2.CheckResponse:  # fmt: skip
        return wait_until(lambda: (r := self.check(request)).policy_version == version and r,
                          timeout=timeout, what=f"policy version {version} in force")


def listing(title: str = "ceramic mug, blue glaze", description: str = "a sturdy mug, barely used",
            price_cents: int = 1200, category: str = "mug", photos: tuple[bytes, ...] = (),
            attributes: dict[str, str] | None = None, models: tuple[str, ...] = ()) -> listing_guard_pb2.CheckRequest:
    attrs = {"width_cm": "9", "height_cm": "10", "depth_cm": "9", "weight_kg": "0.4"} if attributes is None \
        else attributes
    return listing_guard_pb2.CheckRequest(
        listing=listing_guard_pb2.Listing(title=title, description=description, price_cents=price_cents,
                                          category=category, attributes=attrs, images=list(photos)),
        models=list(models),
    )  # fmt: skip


def verdicts(response: listing_guard_pb2.CheckResponse) -> dict[str, Any]:
    return {v.model: v for v in response.verdicts}


def status_name(verdict: Any) -> str:
    return str(listing_guard_pb2.VerdictStatus.Name(verdict.status)).removeprefix("VERDICT_STATUS_")


def decision_name(response: listing_guard_pb2.CheckResponse) -> str:
    return str(listing_guard_pb2.Decision.Name(response.decision)).removeprefix("DECISION_")
