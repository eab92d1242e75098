"""Versioned model artifacts: $MESHSERVE_HOME/models/<kind>/<version>/ with a card.json."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from meshserve.errors import InvalidInput, NotFound

CARD_NAME = "card.json"
KINDS = ("detector", "embedder", "classifier", "shipping")


def meshserve_home() -> Path:
    """Where everything the pipeline writes lives: $MESHSERVE_HOME, default ~/.cache/meshserve."""
    env = os.environ.get("MESHSERVE_HOME", "").strip()
    home = Path(env).expanduser() if env else Path.home() / ".cache" / "meshserve"
    return home


def models_root(home: Path | None = None) -> Path:
    return (home or meshserve_home()) / "models"


def kind_dir(kind: str, home: Path | None = None) -> Path:
    if not kind or "/" in kind or kind.startswith("."):
        raise InvalidInput(f"bad model kind {kind!r}")
    return models_root(home) / kind


@dataclass(frozen=True)
class ModelCard:
    """What an artifact says about itself; written last, so its presence marks it complete."""

    kind: str
    version: str
    data_seed: int
    metrics: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    signature: dict[str, Any] = field(default_factory=dict)
    training_time_s: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)
    name: str = ""  # the model's own name when one kind holds several (one classifier per category)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True, default=_jsonable)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCard:
        known = {f for f in cls.__dataclass_fields__}
        missing = {"kind", "version", "data_seed"} - set(data)
        if missing:
            raise InvalidInput(f"model card lacks {sorted(missing)}")
        return cls(**{k: v for k, v in data.items() if k in known})


def _jsonable(value: Any) -> Any:
    """numpy scalars/arrays and paths in metrics or configs become plain JSON."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def new_version(kind: str, home: Path | None = None) -> tuple[str, Path]:
    """A fresh, sortable version id and its (created, empty) directory for `kind`."""
    parent = kind_dir(kind, home)
    parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    for n in range(1000):
        version = f"{stamp}-{n:03d}"
        path = parent / version
        try:
            path.mkdir()  # exclusive: two trainers at once never share a directory
        except FileExistsError:
            continue
        return version, path
    raise RuntimeError(f"could not allocate a version directory under {parent}")


def write_card(artifact_dir: Path, card: ModelCard) -> Path:
    """Write card.json atomically (tmp + rename) so readers never see half a card."""
    artifact_dir = Path(artifact_dir)
    if not card.created_at:
        card = ModelCard(**{**asdict(card), "created_at": now_iso()})
    tmp = artifact_dir / f".{CARD_NAME}.{os.getpid()}.tmp"
    tmp.write_text(card.to_json() + "\n")
    final = artifact_dir / CARD_NAME
    os.replace(tmp, final)
    return final


def read_card(artifact_dir: Path | str) -> ModelCard:
    path = Path(artifact_dir) / CARD_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise NotFound(f"no model card at {path}: not a complete artifact") from None
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"model card {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidInput(f"model card {path} is not a JSON object")
    return ModelCard.from_dict(data)


def list_versions(kind: str, home: Path | None = None) -> list[Path]:
    """Complete artifacts of `kind` (those with a card), oldest first."""
    parent = kind_dir(kind, home)
    if not parent.is_dir():
        return []
    done = [p for p in parent.iterdir() if p.is_dir() and (p / CARD_NAME).is_file()]
    return sorted(done, key=lambda p: p.name)


def latest(kind: str, home: Path | None = None) -> Path | None:
    """The newest complete artifact directory of `kind`, or None when there is none."""
    versions = list_versions(kind, home)
    return versions[-1] if versions else None


def resolve_model_dir(kind: str, model: str | None, home: Path | None = None) -> Path:
    """`--model` as given (a directory, or a version id of `kind`), else the newest artifact."""
    if model:
        path = Path(model).expanduser()
        if not path.is_dir():
            candidate = kind_dir(kind, home) / model
            if candidate.is_dir():
                path = candidate
            else:
                raise NotFound(f"model directory {model!r} does not exist")
        if not (path / CARD_NAME).is_file():
            raise NotFound(f"{path} has no {CARD_NAME}: not a complete {kind} artifact")
        return path
    found = latest(kind, home)
    if found is None:
        where = kind_dir(kind, home)
        raise NotFound(
            f"no {kind} artifact under {where}; run `meshserve train --quick` "
            "or pass --model DIR"
        )
    return found


class Stopwatch:
    """Wall time of a training step, for the card's training_time_s."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start
