"""`meshserve rollout start|status|promote|abort SERVICE`: model rollouts under an automated analysis loop."""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

SERVICES = ("detector", "embedder", "counterfeit", "prohibited", "contact_info", "shipping")  # rollout_policy

_HELP = """
The run writes the traffic policy meshserve/rollout/<service> (which the gateways follow within a
second) and its own state and decisions to meshserve/rollout-state/<service>. Each interval it
scrapes every registered gateway's metrics (registry meta metrics_port): the candidate's error rate
and p99 against the stable's, and the shadow agreement. As good → next step (the last step promotes:
the candidate becomes stable); worse → rolled back to 0 % at once; too few calls → wait. Started
again for the same version, an interrupted run resumes where it stood.

environment:
  CONSUL_HTTP_ADDR   Consul (or `meshserve registry dev`) address, default http://127.0.0.1:8500
"""


def parse_duration(text: str) -> float:
    """60s, 2s, 500ms, 5m or a plain number of seconds."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h)?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r}: need a duration like 60s, 500ms or 5m")
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[match.group(2) or "s"]
    return float(match.group(1)) * scale


def parse_steps(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: need comma-separated percents, e.g. 5,25,50,100") from None


def add_commands(subparsers: Any) -> None:
    rollout = subparsers.add_parser("rollout", help="shadow, canary and promote a model version automatically",
                                    description="Model rollouts driven by the gateways' per-version metrics.",
                                    epilog=_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = rollout.add_subparsers(dest="verb", metavar="VERB", required=True)
    start = verbs.add_parser("start", help="run a rollout to its end (promoted or rolled back)",
                             description="Shadow (optional), then canary steps, judged every interval.")
    start.add_argument("service", choices=SERVICES, metavar="SERVICE", help=" | ".join(SERVICES))
    start.add_argument("--version", required=True, help="the candidate version (registry meta `version`)")
    start.add_argument("--stable", help="the version to keep as stable (default: the policy's, else the newest "
                                        "passing one besides the candidate)")  # fmt: skip
    start.add_argument("--shadow", type=float, default=0.0, metavar="P",
                       help="start with a shadow phase copying P %% of the stable's requests to the candidate, "
                            "kept through the canary steps (default 0: none)")
    start.add_argument("--canary", type=float, metavar="P", help="first canary step (added before --steps)")
    start.add_argument("--steps", type=parse_steps, default=(5.0, 25.0, 50.0, 100.0),
                       help="canary percents, one per interval; reaching 100 promotes (default 5,25,50,100)")
    start.add_argument("--interval", type=parse_duration, default=60.0, help="analysis interval (default 60s)")
    thresholds = " (default: the policy's `analysis`, else %s)"
    start.add_argument("--max-error-rate", type=float,
                       help="candidate error rate above which it is rolled back" + thresholds % "0.05")
    start.add_argument("--max-p99-ratio", type=float,
                       help="candidate p99 / stable p99 above which it is rolled back" + thresholds % "1.5")
    start.add_argument("--min-agreement", type=float,
                       help="mean shadow agreement below which it is rolled back" + thresholds % "0.5")
    start.add_argument("--min-requests", type=int,
                       help="fewer candidate calls in an interval: wait" + thresholds % "20")
    start.add_argument("--metrics", action="append", default=[], metavar="URL",
                       help="a gateway metrics URL to read (repeat; default: every registered gateway)")
    start.set_defaults(func=_start)
    status = verbs.add_parser("status", help="the policy and the run's state and last decisions")
    status.add_argument("service", choices=SERVICES, metavar="SERVICE")
    status.add_argument("--json", action="store_true", help="print as JSON")
    status.set_defaults(func=_status)
    for verb, what in (("promote", "make the candidate stable now"), ("abort", "send the candidate 0 %% now")):
        parser = verbs.add_parser(verb, help=what)
        parser.add_argument("service", choices=SERVICES, metavar="SERVICE")
        parser.set_defaults(func=_finish, status_after="promoted" if verb == "promote" else "aborted")
    for parser in (start, status, *(verbs.choices[v] for v in ("promote", "abort"))):
        parser.add_argument("--consul", help="Consul HTTP address (default: $CONSUL_HTTP_ADDR)")


def _fail(command: str, message: str, code: int = 1) -> int:
    print(f"meshserve rollout {command}: {message}", file=sys.stderr)
    return code


def _start(args: argparse.Namespace) -> int:
    import asyncio

    from meshserve.errors import MeshError
    from meshserve.gateway.rollout_run import StartOptions, run_rollout
    from meshserve.registry.config import RegistryConfig
    from meshserve.rpc.tls_files import client_files
    from meshserve.telemetry import TracingConfig, setup_tracing, shutdown_tracing

    steps = args.steps if args.canary is None else tuple(sorted({args.canary, *args.steps}))
    given = {"max_error_rate": args.max_error_rate, "max_p99_ratio": args.max_p99_ratio,
             "min_agreement": args.min_agreement, "min_requests": args.min_requests}  # fmt: skip
    thresholds = tuple((k, v) for k, v in given.items() if v is not None)
    try:
        options = StartOptions(args.service, args.version, steps, args.shadow, args.interval, thresholds, args.stable,
                               tuple(args.metrics), tls=client_files())  # fmt: skip
    except MeshError as exc:
        return _fail("start", str(exc), 2)
    setup_tracing(TracingConfig.from_env("meshserve-rollout"))
    try:
        run = asyncio.run(run_rollout(RegistryConfig.from_env(args.consul), options))
    except (MeshError, ValueError) as exc:
        return _fail("start", str(exc))
    finally:
        shutdown_tracing()
    print(f"{run.service} {run.version}: {run.status}")
    return 0 if run.status == "promoted" else 3


def _status(args: argparse.Namespace) -> int:
    import asyncio
    import json

    from meshserve.errors import MeshError
    from meshserve.gateway.rollout_run import load_run
    from meshserve.gateway.rollout_store import read_rollout
    from meshserve.registry.client import RegistryClient
    from meshserve.registry.config import RegistryConfig

    async def read() -> dict[str, Any]:
        async with RegistryClient(RegistryConfig.from_env(args.consul)) as client:
            run = await load_run(client, args.service)
            stored = await read_rollout(client, args.service)
        return {"policy": stored.describe(), "run": json.loads(run.to_json()) if run else None}

    try:
        found = asyncio.run(read())
    except (MeshError, ValueError) as exc:
        return _fail("status", str(exc))
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    print(f"policy {found['policy']['key']} version {found['policy']['modify_index']}: "
          f"{json.dumps(found['policy']['document'])}")  # fmt: skip
    run = found["run"]
    if run is None:
        print("no rollout run")
        return 0
    print(f"run: {run['version']} over stable {run['stable']}, {run['status']}, step {run['step']} "
          f"of {run['steps']}, shadow {run['shadow_percent']:g}%")  # fmt: skip
    for event in run["events"][-10:]:
        print(f"  {event['decision']:<18} canary {event['canary_percent']:g}%  {'; '.join(event['reasons'])}")
    return 0


def _finish(args: argparse.Namespace) -> int:
    import asyncio

    from meshserve.errors import MeshError
    from meshserve.gateway.rollout_run import finish
    from meshserve.registry.config import RegistryConfig

    try:
        run = asyncio.run(finish(RegistryConfig.from_env(args.consul), args.service, args.status_after))
    except (MeshError, ValueError) as exc:
        return _fail(args.verb, str(exc))
    print(f"{run.service} {run.version}: {run.status}; stable is now {run.policy().stable}")
    return 0
