"""The continuous loop: new listings arrive, a delta shard is built and published for them, shards
past their retention are retired; a new embedder version gets a complete shard set of its own.

State (which shards this pipeline published, for which embedder version and items) lives in
MESHSERVE_HOME/pipeline/state.json, written atomically after every step that changes the mesh,
so a crash between cycles loses nothing and a restart carries on.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from meshserve.inference.artifacts import latest, meshserve_home
from meshserve.inference.shards import HnswParams
from meshserve.registry.config import RegistryConfig
from meshserve.training.catalogue import append_items, load_items
from meshserve.training.publish import PublishConfig, publish, retire
from meshserve.training.shard_build import ItemSlice, build_from_catalogue

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineConfig:
    registry: RegistryConfig
    home: Path | None = None
    new_items: int = 50  # listings arriving per cycle
    retention_s: float = 7 * 24 * 3600.0  # delta shards older than this are retired
    initial_shards: int = 4  # a new embedder version's set covers the catalogue in this many
    replicas: int = 1
    index: str = "catalogue"
    check_interval_s: float = 1.0
    params: HnswParams = field(default_factory=HnswParams)

    def __post_init__(self) -> None:
        if self.new_items < 0 or self.initial_shards < 1 or self.retention_s <= 0:
            raise ValueError("new_items ≥ 0, initial_shards ≥ 1 and retention > 0 are required")

    @property
    def root(self) -> Path:
        return (self.home or meshserve_home()) / "pipeline"


@dataclass(frozen=True)
class PublishedShard:
    shard: str
    embedder_version: str
    directory: str
    lo: int  # item ids [lo, hi)
    hi: int
    published_at: float
    base: bool  # part of a version's initial set (kept), or a delta (retired after retention)


@dataclass
class PipelineState:
    generation: int = 0
    shards: list[PublishedShard] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> PipelineState:
        if not path.is_file():
            return cls()
        raw = json.loads(path.read_text())
        return cls(generation=raw["generation"], shards=[PublishedShard(**s) for s in raw["shards"]])

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"generation": self.generation, "shards": [asdict(s) for s in self.shards]},
                                  indent=2))  # fmt: skip
        os.replace(tmp, path)

    def versions(self) -> set[str]:
        return {s.embedder_version for s in self.shards}


@dataclass
class CycleReport:
    generation: int
    arrived: int = 0
    published: list[PublishedShard] = field(default_factory=list)
    retired: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"generation {self.generation}: {self.arrived} new listings"]
        out += [f"  published {s.shard} ({s.embedder_version}, items [{s.lo}, {s.hi})) → {s.directory}"
                for s in self.published]  # fmt: skip
        out += [f"  retired {shard}" for shard in self.retired]
        return out


class Pipeline:
    def __init__(self, config: PipelineConfig):
        self.config = config
        self.state_path = config.root / "state.json"
        self.state = PipelineState.load(self.state_path)

    def run_once(self) -> CycleReport:
        cfg = self.config
        embedder_dir = latest("embedder", cfg.home)
        if embedder_dir is None:
            raise FileNotFoundError("no embedder artifact: run `meshserve train --quick` first")
        version = embedder_dir.name
        self.state.generation += 1
        report = CycleReport(self.state.generation)

        if version not in self.state.versions():
            self._publish_complete_set(version, embedder_dir, report)
        if cfg.new_items:
            arrived = append_items(cfg.new_items, cfg.home)
            report.arrived = len(arrived)
            lo, hi = arrived[0].item_id, arrived[-1].item_id + 1
            for live_version in sorted(self.state.versions()):
                # every live version learns the new items: a version's set stays complete
                self._publish(f"delta-g{self.state.generation}", live_version, lo, hi, base=False,
                              report=report)  # fmt: skip
        self._retire_expired(report)
        self.state.save(self.state_path)
        return report

    def _publish_complete_set(self, version: str, embedder_dir: Path, report: CycleReport) -> None:
        """Cover the same items the live sets cover (or the whole catalogue) for a new version."""
        if self.state.shards:
            slices = sorted({(s.shard, s.lo, s.hi, s.base) for s in self.state.shards})
        else:
            ids = [item.item_id for item in load_items(self.config.home)]
            if not ids:
                raise FileNotFoundError("the catalogue is empty: run `meshserve train --quick` first")
            n, parts = len(ids), self.config.initial_shards
            bounds = [ids[0] + (n * i) // parts for i in range(parts)] + [ids[-1] + 1]
            slices = [(f"base-{i}", bounds[i], bounds[i + 1], True) for i in range(parts)]
        for shard, lo, hi, base in slices:
            self._publish(shard, version, lo, hi, base=base, report=report, embedder_dir=embedder_dir)

    def _publish(self, shard: str, version: str, lo: int, hi: int, *, base: bool, report: CycleReport,
                 embedder_dir: Path | None = None) -> None:  # fmt: skip
        cfg = self.config
        directory = cfg.root / "shards" / version / shard
        build_from_catalogue(directory, ItemSlice("ids", lo, hi), embedder=str(embedder_dir or version),
                             index=cfg.index, shard=shard, generation=self.state.generation,
                             params=cfg.params, home=cfg.home)  # fmt: skip
        publish(directory, PublishConfig(registry=cfg.registry, replicas=cfg.replicas,
                                         check_interval_s=cfg.check_interval_s), cfg.home)  # fmt: skip
        record = PublishedShard(shard, version, str(directory), lo, hi, time.time(), base)
        self.state.shards.append(record)
        self.state.save(self.state_path)
        report.published.append(record)
        log.info("published %s for %s: items [%d, %d)", shard, version, lo, hi)

    def _retire_expired(self, report: CycleReport) -> None:
        cutoff = time.time() - self.config.retention_s
        expired = {s.shard for s in self.state.shards if not s.base and s.published_at < cutoff}
        for shard in sorted(expired):
            retire(shard, self.config.registry, self.config.home)
            report.retired.append(shard)
        self.state.shards = [s for s in self.state.shards if s.shard not in expired]
