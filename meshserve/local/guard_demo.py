"""The listing-guard part of `meshserve demo`: catalogue listings through ListingGuard/Check, one
blocked, one allowed, then the allowed one again with a classifier stopped (a partial answer)."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from meshserve.local.mesh import MeshInfo

Say = Callable[[str], None]
CANDIDATES = 40  # catalogue listings tried to find one the policy blocks and one it allows


def _request(item: Any) -> Any:
    from meshserve.gateway.guard_client import check_request

    sizes = {"width_cm": item.width_cm, "height_cm": item.height_cm, "depth_cm": item.depth_cm,
             "weight_kg": item.weight_kg}  # fmt: skip
    return check_request(item.title, item.description, round(item.price * 100), item.category,
                         {k: f"{v:g}" for k, v in sizes.items()})  # fmt: skip


def _show(say: Say, label: str, item: Any, response: Any) -> None:
    from meshserve.gateway.guard_client import check_json

    result = check_json(response)
    say(f"{label}: {item.title!r} ({item.price:.2f}, {item.category}; catalogue violations "
        f"{list(item.violations) or 'none'})")  # fmt: skip
    say(f"    → {result['decision'].upper()}{'  (partial)' if result['partial'] else ''}  "
        f"policy {result['policy_version']}  trace {result['trace_id'] or '-'}")
    for reason in result["reasons"]:
        say(f"      because {reason}")
    for v in result["verdicts"]:
        what = v["label"] or f"{v['score']:.3f}"
        say(f"      {v['model']:<13} {v['status']:<11} {what}{'  ' + v['detail'] if v['detail'] else ''}")


def run_guard_demo(info: MeshInfo, home: Path, say: Say) -> None:
    from meshserve.gateway.guard_client import CheckFailed, check_listing
    from meshserve.training.catalogue import load_items

    classifiers = [e for e in info.endpoints if e.role == "classifier"]
    if not classifiers:
        say("no classifiers in this mesh: skipping the listing checks")
        return
    say("\nlisting checks (meshserve guard check): catalogue listings through ListingGuard/Check")
    items = load_items(home)
    # Listings the catalogue marks as violating first, so one the policy blocks turns up quickly.
    candidates = sorted(items, key=lambda i: (not i.violations, i.item_id))[:CANDIDATES // 2]
    candidates += [i for i in items if not i.violations][:CANDIDATES // 2]
    checked = []
    for item in candidates:
        try:
            checked.append((item, check_listing(info.gateway, _request(item), timeout=5)))
        except CheckFailed as exc:
            say(f"    check of item {item.item_id} failed: {exc}")
    blocked = [(i, r) for i, r in checked if r.decision == 3]
    allowed = [(i, r) for i, r in checked if r.decision == 1]
    if blocked:
        _show(say, "blocked", *blocked[0])
    else:
        say(f"none of {len(checked)} listings reached a block threshold under this policy")
    if not allowed:
        say(f"none of {len(checked)} listings was allowed under this policy")
        return
    item, _ = allowed[0]
    _show(say, "allowed", *allowed[0])

    stopped = classifiers[0]
    say(f"\nstopping {stopped.name} (pid {stopped.child.proc.pid}) and checking the allowed listing again …")
    stopped.child.proc.send_signal(signal.SIGTERM)
    stopped.child.proc.wait(timeout=30)
    deadline, response = time.monotonic() + 15, None
    while time.monotonic() < deadline:
        response = check_listing(info.gateway, _request(item), timeout=5)
        if response.partial:
            break
        time.sleep(0.2)
    if response is not None:
        _show(say, "with a classifier stopped", item, response)
