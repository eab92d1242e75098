"""Serving a model loads no training code: checked in a fresh interpreter, on real trained models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# The training room's command modules are registered by `meshserve` itself; test_layers.py checks
# that their module level imports nothing of meshserve.
TRAINING_COMMANDS = {"meshserve.training", "meshserve.training.cli", "meshserve.training.shard_cli",
                     "meshserve.training.train_cli"}  # fmt: skip

LOAD_KIND = """
import json, sys
from meshserve.servers import {kind} as kind
from meshserve.inference.artifacts import latest
model = kind.{cls}(str(latest("{kind}")))
model.load()
model.warmup()
print(json.dumps(sorted(sys.modules)))
"""

SERVE_THROUGH_CLI = """
import json, sys
from meshserve.cli import build_parser
args = build_parser().parse_args(["serve", "{kind}", "--no-register"])
model = args.build_model(args)
model.load()
model.warmup()
print(json.dumps(sorted(sys.modules)))
"""


def modules_after(script: str, home: Path) -> set[str]:
    env = {**os.environ, "MESHSERVE_HOME": str(home), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("kind, cls", [("detector", "DetectorModel"), ("embedder", "EmbedderModel")])
def test_loading_a_served_model_imports_no_training_module(tiny_home: Path, kind: str, cls: str) -> None:
    modules = modules_after(LOAD_KIND.format(kind=kind, cls=cls), tiny_home)
    assert f"meshserve.inference.{kind}" in modules  # the check below looks at a process that loaded the model
    assert "torch" in modules
    training = sorted(m for m in modules if m == "meshserve.training" or m.startswith("meshserve.training."))
    assert training == []
    # warm means warm for images too: PIL imports a format's plugin on its first open, which would
    # otherwise land on the first request (~8 ms for JPEG)
    assert {f"PIL.{name}ImagePlugin" for name in ("Jpeg", "Png", "Bmp", "WebP")} <= modules


def test_meshserve_serve_detector_imports_no_training_code(tiny_home: Path) -> None:
    modules = modules_after(SERVE_THROUGH_CLI.format(kind="detector"), tiny_home)
    assert "meshserve.inference.detector" in modules and "meshserve.servers.cli" in modules
    training = {m for m in modules if m == "meshserve.training" or m.startswith("meshserve.training.")}
    assert training <= TRAINING_COMMANDS, sorted(training - TRAINING_COMMANDS)
