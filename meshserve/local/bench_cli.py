"""`meshserve bench [NAME] [ARGS…]`: list the source tree's benchmarks, or run one with this interpreter."""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from pathlib import Path
from typing import Any


class NoSourceTree(RuntimeError):
    """meshserve is installed without its source checkout, so there is no bench/ to run."""


def bench_dir() -> Path:
    """The `bench/` folder beside the package: present only in a source checkout (bench is not installed)."""
    import meshserve

    root = Path(meshserve.__file__).resolve().parent.parent
    found = root / "bench"
    if not (found.is_dir() and (root / "pyproject.toml").is_file()):
        raise NoSourceTree(f"no bench/ beside {root}: the benchmarks live in the source tree, not in the "
                           "installed package; clone the repository, `pip install -e .` in it, and run "
                           "`meshserve bench` again")  # fmt: skip
    return found


def summary(script: Path) -> str:
    """The first line of a script's module docstring, read without running it."""
    try:
        doc = ast.get_docstring(ast.parse(script.read_text(encoding="utf-8"), filename=str(script)))
    except (OSError, SyntaxError, ValueError) as exc:
        return f"(unreadable: {exc})"
    return doc.strip().splitlines()[0] if doc and doc.strip() else "(no description)"


def benchmarks(directory: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(directory.glob("*.py")) if not p.name.startswith("_")}


def add_commands(subparsers: Any) -> None:
    bench = subparsers.add_parser(
        "bench", help="list the benchmarks, or run one",
        description="Without NAME: list the benchmarks in the source tree's bench/ folder. With NAME: run "
        "bench/NAME.py with the remaining arguments (try `meshserve bench NAME --help`). Benchmarks print "
        "their figures beside a baseline measured in the same run; on a shared machine run them with nice.",
    )  # fmt: skip
    bench.add_argument("name", nargs="?", metavar="NAME", help="benchmark to run (omit to list them)")
    bench.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS", help="arguments for the benchmark")
    bench.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> int:
    try:
        found = benchmarks(bench_dir())
    except NoSourceTree as exc:
        print(f"meshserve bench: {exc}", file=sys.stderr)
        return 2
    if args.name is None:
        width = max((len(name) for name in found), default=0)
        for name, script in found.items():
            print(f"{name:<{width}}  {summary(script)}")
        print("\nrun one: meshserve bench NAME [ARGS…]   (meshserve bench NAME --help for its options)")
        return 0
    chosen = found.get(args.name)
    if chosen is None:
        print(f"meshserve bench: no benchmark {args.name!r}; there are: {', '.join(found) or 'none'}",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        return subprocess.run([sys.executable, str(chosen), *args.args]).returncode
    except KeyboardInterrupt:
        return 130
