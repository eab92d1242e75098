"""`meshserve serve <kind>`: run one model kind behind the model-server runtime.

Adding a kind: put a module in servers/ that is cheap to import (torch and weights only inside
its functions) with `add_arguments(parser)` for its own flags and `build(args) -> Model`, then add
one line to KINDS below.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from meshserve.rpc.tls_files import add_tls_arguments, tls_from_args
from meshserve.servers import classifier, detector, embedder, identity, indexer, shipping

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Kind:
    module: ModuleType  # has add_arguments(parser) and build(args) -> Model
    help: str
    service: str  # Consul service name (contract names in registry/config.py SERVICE_NAMES)


KINDS: dict[str, Kind] = {
    "identity": Kind(
        identity,
        "returns its input (tests and benchmarks; --delay-ms, --batch-cost-ms)",
        "meshserve-identity",
    ),
    "indexer": Kind(
        indexer,
        "nearest-neighbour search over index shards (--shard DIR, repeat it for several in one process)",
        "meshserve-indexer",
    ),
    "detector": Kind(
        detector,
        "product boxes, labels and scores for one encoded image per row (--model DIR)",
        "meshserve-detector",
    ),
    "embedder": Kind(
        embedder,
        "one L2-normalised vector per box of an encoded image (--model DIR)",
        "meshserve-embedder",
    ),
    "classifier": Kind(
        classifier,
        "one listing-policy classifier, e.g. counterfeit (--model NAME|DIR)",
        "meshserve-classifier",
    ),
    "shipping": Kind(
        shipping,
        "shipping-size estimator, k-nearest neighbours over past listings (--model DIR)",
        "meshserve-shipping",
    ),
}

_COMMON_HELP = """
environment:
  CONSUL_HTTP_ADDR     Consul (or `meshserve registry dev`) address, default http://127.0.0.1:8500
  CONSUL_HTTP_TOKEN    Consul ACL token (never pass tokens as flags)
  OTEL_EXPORTER_OTLP_ENDPOINT  send spans over OTLP/gRPC; OTEL_SERVICE_NAME names the service
  OTEL_SDK_DISABLED=true       no tracing
  MESHSERVE_TRACE_FILE         JSON-lines span file when no OTLP endpoint is set (= --trace-file)

lifecycle: health is NOT_SERVING until the model is loaded and warm, then SERVING, then the
server registers in Consul. SIGTERM/SIGINT: NOT_SERVING, deregister, drain in-flight calls for
at most --grace seconds, exit 0.
"""


def add_commands(subparsers: Any) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="run a model server of one kind",
        description="Run one model as a gRPC PredictionService server registered in Consul "
        "(it also speaks the Open Inference Protocol v2: inference.GRPCInferenceService).",
    )
    kinds = serve.add_subparsers(dest="kind", metavar="KIND", required=True)
    for name, kind in KINDS.items():
        parser = kinds.add_parser(
            name,
            help=kind.help,
            description=f"Serve the {name} model kind: {kind.help}.",
            epilog=_COMMON_HELP,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _add_common_arguments(parser, kind)
        model_args = parser.add_argument_group(f"{name} model")
        kind.module.add_arguments(model_args)
        add_tls_arguments(parser)
        parser.set_defaults(func=_serve, build_model=kind.module.build)


def _add_common_arguments(parser: argparse.ArgumentParser, kind: Kind) -> None:
    net = parser.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    net.add_argument("--port", type=int, default=0, help="gRPC port (default 0: any free port)")
    net.add_argument(
        "--advertise-address",
        help="address registered in Consul, for containers (default: --host, or this host's "
        "address when binding 0.0.0.0)",
    )
    net.add_argument("--port-file", type=Path, help="write the bound port here once listening")
    net.add_argument(
        "--http-port", type=int,
        help="also serve the Open Inference Protocol v2 REST form (/v2/…, as Triton/KServe HTTP "
        "clients call it) on this port (0: any free port; default: off); HTTPS wanting a mesh client "
        "certificate when mTLS is on. The gRPC port always speaks it too (inference.GRPCInferenceService)",
    )  # fmt: skip
    net.add_argument(
        "--max-message-bytes",
        type=int,
        default=8 * 1024 * 1024,
        help="largest request or response message; bigger → RESOURCE_EXHAUSTED (default 8 MiB)",
    )
    work = parser.add_argument_group("batching and limits")
    work.add_argument(
        "--max-batch-size",
        type=int,
        default=8,
        help="rows merged into one model call; 1 turns dynamic batching off (default 8)",
    )
    work.add_argument(
        "--max-queue-delay-ms",
        type=float,
        default=0.0,
        help="longest the first request of a batch waits for others to join it; with 0 "
        "(default) requests that queued while the model was busy are still merged, but an "
        "idle model never waits",
    )
    work.add_argument(
        "--max-inflight",
        type=int,
        default=64,
        help="requests admitted at once (queued + running); beyond it → RESOURCE_EXHAUSTED "
        "at once (default 64)",
    )
    work.add_argument(
        "--workers", type=int, default=1, help="model calls running at the same time (default 1)"
    )
    work.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch/OpenMP threads of this process (default 1: 2 cores are shared)",
    )
    work.add_argument(
        "--grace", type=float, default=10.0, help="seconds to drain in-flight calls on SIGTERM (default 10)"
    )
    work.add_argument(
        "--inject-delay-ms", type=float, default=0.0,
        help="fault injection: make every model call this much slower (drills and tests; default 0)",
    )  # fmt: skip
    work.add_argument(
        "--inject-error-rate", type=float, default=0.0, metavar="P",
        help="fault injection: fail this share of model calls with INTERNAL, 0..1 (drills and tests; default 0)",
    )  # fmt: skip
    reg = parser.add_argument_group("registry and observability")
    reg.add_argument(
        "--consul", help="Consul HTTP address (default: $CONSUL_HTTP_ADDR or http://127.0.0.1:8500)"
    )
    reg.add_argument(
        "--no-register", action="store_true", help="do not register in Consul (local use)"
    )
    reg.add_argument("--service-name", default=kind.service, help=f"default {kind.service}")
    reg.add_argument(
        "--instance-id", help="Consul service id (default: <service>-<address>-<port>)"
    )
    reg.add_argument(
        "--check-interval", type=float, default=1.0, help="Consul gRPC check interval, s (≤ 2)"
    )
    reg.add_argument(
        "--deregister-after",
        type=float,
        default=60.0,
        help="Consul removes the instance after its check has been critical this long (s)",
    )
    reg.add_argument(
        "--resync-interval", type=float, default=10.0,
        help="seconds between checks that the Consul agent still lists this server (re-registers if not)",
    )  # fmt: skip
    reg.add_argument(
        "--metrics-port", type=int,
        help="serve Prometheus /metrics on this port, 0 for any free one; registered as meta metrics_port "
        "(default: off); HTTPS wanting a mesh client certificate when mTLS is on (meta metrics_scheme=https)",
    )
    reg.add_argument(
        "--trace-file",
        type=Path,
        default=os.environ.get("MESHSERVE_TRACE_FILE") or None,
        help="write finished spans as JSON lines here (when OTEL_EXPORTER_OTLP_ENDPOINT is unset)",
    )


def _serve(args: argparse.Namespace) -> int:
    from meshserve.registry.config import RegistryConfig
    from meshserve.servers.batching import BatchingConfig
    from meshserve.servers.server import ModelServer, ServerConfig, configure_threads

    try:
        if args.threads < 1:
            raise ValueError("--threads must be >= 1")
        configure_threads(args.threads)  # before the kind imports torch: OMP reads env once
        registry = None if args.no_register else RegistryConfig.from_env(http_addr=args.consul)
        config = ServerConfig(
            service_name=args.service_name,
            host=args.host,
            port=args.port,
            advertise_address=args.advertise_address,
            batching=BatchingConfig(
                max_batch_size=args.max_batch_size,
                max_queue_delay_ms=args.max_queue_delay_ms,
                max_inflight=args.max_inflight,
                workers=args.workers,
            ),
            max_message_bytes=args.max_message_bytes,
            grace_s=args.grace,
            metrics_port=args.metrics_port,
            http_port=args.http_port,
            register=not args.no_register,
            registry=registry,
            instance_id=args.instance_id,
            check_interval_s=args.check_interval,
            deregister_critical_after_s=args.deregister_after,
            resync_interval_s=args.resync_interval,
            trace_file=args.trace_file,
            port_file=args.port_file,
            tls=tls_from_args(args),
        )
        model = args.build_model(args)
        if args.inject_delay_ms:
            from meshserve.servers.faults import DelayedModel

            model = DelayedModel(model, args.inject_delay_ms)
        if args.inject_error_rate:
            from meshserve.servers.faults import ErroringModel

            model = ErroringModel(model, args.inject_error_rate)
    except ValueError as exc:
        print(f"meshserve serve {args.kind}: {exc}", file=sys.stderr)
        return 2
    configure_threads(args.threads)  # again, now that the kind may have imported torch
    from meshserve.rpc import event_loop

    return event_loop.run(ModelServer(model, config).run())
