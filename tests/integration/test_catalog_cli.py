"""`meshserve catalog items|render` as a real child process in a fresh MESHSERVE_HOME."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests.support import meshserve_argv


def _run(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MESHSERVE_HOME": str(home)}
    return subprocess.run(meshserve_argv(*args), env=env, capture_output=True, text=True,
                          timeout=120)


def test_build_list_and_render_deterministically(tmp_path: Path) -> None:
    home = tmp_path / "home"
    built = _run(home, "catalog", "build", "--items", "60", "--seed", "4")
    assert built.returncode == 0, built.stderr
    listed = _run(home, "catalog", "items", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [r["item_id"] for r in rows] == list(range(60))
    assert {"title", "price", "category", "shipping_size", "violations", "look"} <= set(rows[0])
    plain = _run(home, "catalog", "items", "--limit", "3")
    assert plain.returncode == 0 and len(plain.stdout.splitlines()) == 3

    a, b = tmp_path / "a.jpg", tmp_path / "b.jpg"
    r1 = _run(home, "catalog", "render", "7", "--seed", "3", "-o", str(a), "--json")
    r2 = _run(home, "catalog", "render", "7", "--seed", "3", "-o", str(b))
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
    assert a.read_bytes() == b.read_bytes() and a.read_bytes()[:2] == b"\xff\xd8"
    truth = json.loads(r1.stdout)
    assert truth["objects"][0]["item_id"] == 7
    assert truth["objects"][0]["category"] == rows[7]["category"]
    c = tmp_path / "c.jpg"
    assert _run(home, "catalog", "render", "7", "--seed", "4", "-o", str(c)).returncode == 0
    assert c.read_bytes() != a.read_bytes()


def test_unknown_item_is_a_clear_error(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert _run(home, "catalog", "build", "--items", "10").returncode == 0
    bad = _run(home, "catalog", "render", "10", "--seed", "1", "-o", str(tmp_path / "x.jpg"))
    assert bad.returncode == 2
    assert "no item 10" in bad.stderr
    assert not (tmp_path / "x.jpg").exists()
    empty = _run(home, "catalog", "build", "--items", "0")
    assert empty.returncode == 2 and "--items" in empty.stderr
