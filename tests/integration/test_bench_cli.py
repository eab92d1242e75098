"""`meshserve bench`: lists the source tree's benchmarks, runs one, and says plainly when there is no source tree."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import meshserve
from tests.support import meshserve_argv

BENCH = Path(meshserve.__file__).resolve().parent.parent / "bench"


def run(*args: str, timeout: float = 120, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, **kwargs)  # type: ignore[call-overload]


def test_lists_every_benchmark_with_its_docstring_line() -> None:
    done = run(*meshserve_argv("bench"))
    assert done.returncode == 0, done.stderr
    listed = {line.split()[0]: line.split(None, 1)[1] for line in done.stdout.splitlines()[:-2] if line.strip()}
    scripts = sorted(BENCH.glob("*.py"))
    assert scripts and set(listed) == {p.stem for p in scripts}
    for script in scripts:
        first_line = ast.get_docstring(ast.parse(script.read_text())).splitlines()[0]  # type: ignore[union-attr]
        assert listed[script.stem] == first_line


def test_runs_a_benchmark_with_its_arguments() -> None:
    done = run(*meshserve_argv("bench", "shards", "--items", "2000", "--queries", "50"))
    assert done.returncode == 0, done.stderr
    assert "items 2,000" in done.stdout and "queries 50" in done.stdout
    rows = [line.split() for line in done.stdout.splitlines() if line.split()[:1] in (["1"], ["4"], ["8"])]
    assert [r[0] for r in rows] == ["1", "4", "8"]
    assert all(0.0 <= float(r[1]) <= 1.0 for r in rows)  # recall@10 of each shard count


def test_unknown_benchmark_is_a_clear_error() -> None:
    done = run(*meshserve_argv("bench", "no-such-bench"))
    assert done.returncode == 2
    assert "no benchmark 'no-such-bench'" in done.stderr and "shards" in done.stderr


def test_an_install_without_the_source_tree_says_so(tmp_path: Path) -> None:
    """meshserve as site-packages would hold it (no bench/, no pyproject.toml beside the package)."""
    source = Path(meshserve.__file__).resolve().parent
    installed = tmp_path / "site-packages" / "meshserve"
    (installed / "local").mkdir(parents=True)
    shutil.copy(source / "__init__.py", installed / "__init__.py")
    shutil.copy(source / "local" / "__init__.py", installed / "local" / "__init__.py")
    shutil.copy(source / "local" / "bench_cli.py", installed / "local" / "bench_cli.py")
    code = ("import argparse, sys; from meshserve.local import bench_cli; "
            "sys.exit(bench_cli._bench(argparse.Namespace(name=None, args=[])))")  # fmt: skip
    done = run(sys.executable, "-S", "-c", code, cwd=tmp_path, env={"PYTHONPATH": str(installed.parent)})
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "the benchmarks live in the source tree" in done.stderr and "pip install -e ." in done.stderr
