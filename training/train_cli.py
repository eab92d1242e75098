"""`meshserve train`: build the catalogue if needed, train and evaluate every model, write artifacts."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_commands(subparsers: Any) -> None:
    train = subparsers.add_parser(
        "train",
        help="train every model on the synthetic catalogue and write versioned artifacts",
        description="Build the catalogue in $MESHSERVE_HOME when missing, train the detector, "
        "embedder, listing classifiers and shipping-size estimator, evaluate each on held-out "
        "data, and write $MESHSERVE_HOME/models/<kind>/<version>/ with a card.json each.",
    )
    train.add_argument("--quick", action="store_true",
                       help="smaller schedules: about 3 minutes on 2 cores, still usable models")
    train.add_argument("--seed", type=int, default=None,
                       help="catalogue data seed (default: the stored catalogue's, else 1234); "
                       "a different one rebuilds the catalogue")
    train.add_argument("--items", type=int, default=None,
                       help="catalogue size (default: the stored catalogue's, else 2000)")
    train.add_argument("--only", default=",".join(_stages()),
                       help="comma-separated kinds to train (default: all)")
    train.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.add_argument("--json", action="store_true", help="print the results as JSON too")
    train.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests only
    train.set_defaults(func=_cmd_train)


def _stages() -> tuple[str, ...]:
    return ("detector", "embedder", "classifier", "shipping")


def _cmd_train(args: argparse.Namespace) -> int:
    from meshserve.errors import MeshError
    from meshserve.training.train import TrainPlan, run, summary_table

    if args.threads < 1:
        print("error: --threads must be at least 1", file=sys.stderr)
        return 2
    try:
        plan = TrainPlan(
            quick=args.quick,
            seed=args.seed,
            n_items=args.items,
            only=tuple(s.strip() for s in args.only.split(",") if s.strip()),
            progress=not args.no_progress and sys.stderr.isatty(),
            tiny=args.tiny,
        )
    except ValueError as exc:  # checked before torch is imported: a typo fails fast
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(args.threads)
    try:
        results, info = run(plan)
    except (ValueError, MeshError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary_table(results, info))
    if args.json:
        print(json.dumps({"info": info, "results": [vars(r) for r in results]}, sort_keys=True))
    return 1 if any(r.status == "failed" for r in results) else 0
