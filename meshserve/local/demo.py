"""`meshserve demo`: bring the mesh up, search held-out photos, draw the results, show one trace."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from meshserve.local.mesh import LocalMesh, MeshConfig

Say = Callable[[str], None]
DEMO_SEEDS = 3_000_000_000  # no training or evaluation run renders with these seeds


@dataclass(frozen=True)
class HeldOutPhoto:
    jpeg: bytes
    item_ids: tuple[int, ...]


def held_out_photos(home: Path, count: int) -> list[HeldOutPhoto]:
    """Fresh photos of catalogue items (the last one shows two products), never seen in training."""
    from meshserve.training.catalogue import load_items
    from meshserve.training.render import render_photo

    items = load_items(home)
    rng = np.random.default_rng(7)
    picked = [items[int(i)] for i in rng.choice(len(items), size=count + 1, replace=False)]
    photos = []
    for k in range(count):
        group = picked[k : k + 2] if k == count - 1 else [picked[k]]
        photo = render_photo(group, DEMO_SEEDS + k)
        photos.append(HeldOutPhoto(photo.jpeg, tuple(int(i) for i in photo.item_ids)))
    return photos


def read_trace(trace_file: Path, trace_id: str, settle_s: float = 5.0) -> list[dict]:
    """The spans of one trace from the shared JSON-lines file, once they stop arriving."""
    deadline, seen = time.monotonic() + settle_s, -1
    spans: list[dict] = []
    while time.monotonic() < deadline:
        spans = []
        if trace_file.is_file():
            for line in trace_file.read_text().splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line being written right now
                if record.get("trace_id") == trace_id:
                    spans.append(record)
        if spans and len(spans) == seen:
            break
        seen = len(spans)
        time.sleep(0.5)
    return sorted(spans, key=lambda s: s["start_ns"])


def waterfall(spans: list[dict], width: int = 40) -> str:
    """Stage, shard and server spans of one trace as indented bars on a millisecond scale."""
    if not spans:
        return "(no spans recorded)"
    t0 = min(s["start_ns"] for s in spans)
    total = max(s["end_ns"] for s in spans) - t0 or 1
    by_id = {s["span_id"]: s for s in spans}

    def depth(span: dict) -> int:
        d, parent = 0, span.get("parent_span_id")
        while parent in by_id and d < 20:
            d, parent = d + 1, by_id[parent].get("parent_span_id")
        return d

    lines = [f"{'start ms':>9} {'ms':>8}  {'':<{width}}  span"]
    for span in spans:
        start, end = span["start_ns"] - t0, span["end_ns"] - t0
        left = int(width * start / total)
        bar = " " * left + "█" * max(1, int(width * (end - start) / total))
        name = f"{'  ' * depth(span)}{span['service']}: {span['name']}"
        lines.append(f"{start / 1e6:9.1f} {(end - start) / 1e6:8.1f}  {bar[:width]:<{width}}  {name}")
    return "\n".join(lines)


def _title(match: Any) -> str:
    return str(match.attributes.get("title") or f"item {match.item_id}")


def run_demo(config: MeshConfig, out: Path, queries: int = 6, min_score: float = 0.0, say: Say = print) -> int:
    """`min_score` 0 means the gateway's default detection threshold."""
    from meshserve.gateway.client import SearchFailed, search_photo
    from meshserve.local.picture import draw_results

    mesh = LocalMesh(config, say)
    try:
        started = time.monotonic()
        info = mesh.start()
        say(f"\nmesh up in {time.monotonic() - started:.0f}s:\n{info.table()}\n")
        photos = held_out_photos(config.home, queries)
        searches, found = [], 0
        for n, photo in enumerate(photos, 1):
            t = time.perf_counter()
            try:
                response = search_photo(config.gateway_addr, photo.jpeg, top_k=10, timeout=10, min_score=min_score)
            except SearchFailed as exc:
                say(f"query {n}: items {list(photo.item_ids)}  search failed: {exc}")
                continue
            ms = 1000 * (time.perf_counter() - t)
            searches.append((photo.jpeg, response))
            returned = {m.item_id for d in response.detections for m in d.matches}
            hits = [i for i in photo.item_ids if str(i) in returned]
            found += len(hits)
            top = [f"{d.label} → {_title(d.matches[0])} ({d.matches[0].score:.2f})"
                   for d in response.detections if d.matches]  # fmt: skip
            say(f"query {n}: items {list(photo.item_ids)}  {len(response.detections)} detections  "
                f"{'found ' + str(hits) if hits else 'not in top 10'}  {ms:.0f} ms")
            for line in top:
                say(f"    {line}")
        total = sum(len(p.item_ids) for p in photos)
        say(f"\nthe photographed item was in the top 10 for {found}/{total} products")
        sheet = draw_results(searches, out, home=config.home)
        say(f"contact sheet: {sheet}")

        if not searches:
            say("no search succeeded: see the logs under " + str(config.run_dir / "logs"))
            return 1
        first = searches[0][1]
        coverage = first.coverage
        say(f"coverage {coverage.shards_answered}/{coverage.shards_expected}  versions {dict(first.versions)}")
        say(f"\ntrace {first.trace_id} (one search, every stage and shard):")
        say(waterfall(read_trace(info.trace_file or config.run_dir / "traces.jsonl", first.trace_id)))
        say(f"\n(any trace again: meshserve trace {first.trace_id}; to watch the mesh live, run `meshserve up "
            "--prometheus` and open the URL it prints, or `meshserve top` beside a running `meshserve up`)")

        from meshserve.local.guard_demo import run_guard_demo

        run_guard_demo(info, config.home, say)
        return 0
    finally:
        say("\nstopping the mesh …")
        mesh.stop()
        say("stopped")
