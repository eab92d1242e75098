"""The `identity` kind: returns its input unchanged; optional delays make it a stand-in slow model.

Without delays its predict runs on the event loop (Model.runs_inline); `--model-thread` makes it
hop to a model thread like every real model does.

`--delay-ms` is paid per row (batching cannot hide it), `--batch-cost-ms` once per model call
whatever the batch size — a real model's fixed overhead, which is what dynamic batching amortises.
"""

from __future__ import annotations

import argparse
import time

from meshserve.servers.model import Model
from meshserve.wire.signature import BYTES, NUMERIC_DTYPES, Arrays, Params, Signature, TensorSpec


class IdentityModel(Model):
    """y = x (numeric, any width up to max_cols), tag = tag (optional BYTES, one per row)."""

    role = "identity"

    def __init__(
        self,
        name: str = "identity",
        version: str = "1",
        dtype: str = "float32",
        max_rows: int = 1024,
        max_cols: int = 4 * 1024 * 1024,
        max_tag_bytes: int = 1024,
        delay_ms: float = 0.0,
        batch_cost_ms: float = 0.0,
        inline: bool = True,
    ):
        self.name = name
        self.version = version
        self.delay_s = delay_ms / 1000.0
        self.batch_cost_s = batch_cost_ms / 1000.0
        # Returning the input costs microseconds: no hop to a model thread, unless it sleeps
        # (or the hop itself is what is being measured).
        self.runs_inline = inline and delay_ms == 0 and batch_cost_ms == 0
        self.signature = Signature(
            inputs=(
                TensorSpec("x", dtype, (-1, -1), max_shape=(max_rows, max_cols)),
                TensorSpec("tag", BYTES, (-1,), max_shape=(max_rows,),
                           max_element_bytes=max_tag_bytes, optional=True),
            ),
            outputs=(
                TensorSpec("y", dtype, (-1, -1)),
                TensorSpec("tag", BYTES, (-1,), optional=True),
            ),
        )  # fmt: skip
        self.loaded = False

    def load(self) -> None:
        self.loaded = True

    def predict(self, inputs: Arrays, params: Params) -> Arrays:
        x = inputs["x"]
        cost = self.batch_cost_s + self.delay_s * len(x)
        if cost > 0:
            time.sleep(cost)
        out: Arrays = {"y": x}
        if "tag" in inputs:
            out["tag"] = inputs["tag"]
        return out

    def meta(self) -> dict[str, str]:
        return {"dtype": self.signature.inputs[0].dtype}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", default="identity", help="model name (default: identity)")
    parser.add_argument("--model-version", default="1", help="model version (default: 1)")
    parser.add_argument(
        "--dtype", default="float32", choices=NUMERIC_DTYPES, help="dtype of x and y"
    )
    parser.add_argument(
        "--max-rows", type=int, default=1024, help="largest batch one request may carry"
    )
    parser.add_argument(
        "--max-cols", type=int, default=4 * 1024 * 1024, help="largest second dimension of x"
    )
    parser.add_argument(
        "--delay-ms",
        type=float,
        default=0.0,
        help="sleep this long per row in every model call, to simulate a slow model",
    )
    parser.add_argument(
        "--batch-cost-ms",
        type=float,
        default=0.0,
        help="fixed cost of one model call whatever its batch size (what batching amortises)",
    )
    parser.add_argument(
        "--model-thread",
        action="store_true",
        help="run predict on a model thread like a real model, not on the event loop (without "
        "--delay-ms / --batch-cost-ms identity runs inline; this measures the hop it saves)",
    )


def build(args: argparse.Namespace) -> Model:
    return IdentityModel(
        name=args.name,
        version=args.model_version,
        dtype=args.dtype,
        max_rows=args.max_rows,
        max_cols=args.max_cols,
        delay_ms=args.delay_ms,
        batch_cost_ms=args.batch_cost_ms,
        inline=not args.model_thread,
    )
