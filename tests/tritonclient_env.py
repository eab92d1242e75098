"""A virtual environment holding the unmodified tritonclient, made once and cached outside the repo.

tritonclient pins protobuf < 7 and an older grpcio than meshserve's, so it cannot live in the
project's environment: tests run tests/oip_tritonclient.py in this one as a subprocess. It is
keyed by TRITONCLIENT_VERSION under $XDG_CACHE_HOME/meshserve (default ~/.cache/meshserve), and
reused by later runs and CI jobs that keep that directory.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

TRITONCLIENT_VERSION = "2.73.0"
INSTALL_TIMEOUT_S = 900.0  # a first install downloads grpcio, gevent and friends


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "meshserve"


def tritonclient_python() -> Path:
    """The python of the cached environment, creating it first if it is missing or half-made."""
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    venv = root / f"tritonclient-venv-{TRITONCLIENT_VERSION}"
    python = venv / "bin" / "python"
    done = venv / ".meshserve-ready"  # written last: a venv without it was interrupted
    with open(root / f"tritonclient-venv-{TRITONCLIENT_VERSION}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent test runs wait for one install
        if done.exists():
            return python
        _run([sys.executable, "-m", "venv", "--clear", str(venv)])
        _run([str(python), "-m", "pip", "install", "--quiet", f"tritonclient[grpc,http]=={TRITONCLIENT_VERSION}"])
        _run([str(python), "-c", "import tritonclient.grpc, tritonclient.http"])
        done.write_text(TRITONCLIENT_VERSION + "\n")
    return python


def _run(argv: list[str]) -> None:
    # Outside any venv of ours: the new environment must not see meshserve's packages.
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
