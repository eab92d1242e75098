"""The floor plan, checked: no module imports a layer it must not stand on (docs/architecture.md).

Every `import` and `from … import` in the source tree counts, also the ones inside functions:
a lazy import is still an arrow.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Folders on disk → their import package (pyproject's package-dir).
ROOMS = {"meshserve": "meshserve", "registry": "meshserve.registry", "servers": "meshserve.servers",
         "gateway": "meshserve.gateway", "training": "meshserve.training"}  # fmt: skip

# layer → the module prefixes it is made of (the first match, longest prefix first, decides)
LAYERS = {
    "wire": ("meshserve.wire",),
    "inference": ("meshserve.inference",),
    "warehouse": ("meshserve.warehouse",),
    "rpc": ("meshserve.rpc",),
    "registry-dev": ("meshserve.registry.dev",),
    "registry": ("meshserve.registry",),
    "servers": ("meshserve.servers",),
    "gateway": ("meshserve.gateway",),
    "training": ("meshserve.training",),
    "local": ("meshserve.local",),
    "queue": ("meshserve.queue",),
    "jobs": ("meshserve.jobs",),
    "pki": ("meshserve.pki",),
}

# importer layer → layers it must never import
FORBIDDEN = {
    "wire": {"inference", "warehouse", "rpc", "registry", "registry-dev", "servers", "gateway", "training", "local",
             "queue", "jobs"},
    "inference": {"warehouse", "rpc", "registry", "registry-dev", "servers", "gateway", "training", "local",
                  "queue", "jobs"},
    "warehouse": {"wire", "rpc", "registry", "registry-dev", "servers", "gateway", "training", "local", "queue",
                  "jobs"},
    "rpc": {"inference", "registry-dev", "servers", "gateway", "training", "local", "queue", "jobs"},
    "registry": {"wire", "inference", "rpc", "registry-dev", "servers", "gateway", "training", "local", "queue",
                 "jobs"},
    "registry-dev": {"wire", "inference", "rpc", "servers", "gateway", "training", "local", "queue", "jobs"},
    "servers": {"gateway", "training", "local", "registry-dev", "queue", "jobs"},
    "gateway": {"servers", "training", "local", "inference", "registry-dev", "jobs"},
    "training": {"servers", "gateway", "local", "rpc", "queue", "jobs"},
    # the job queue on NATS: records and streams, used by the gateway (Submit, Get) and the worker
    "queue": {"wire", "inference", "warehouse", "rpc", "registry-dev", "servers", "gateway", "training", "local",
              "jobs"},
    # the worker: runs jobs through the gateway's gRPC API (meshserve.v1 stubs), found in the registry
    "jobs": {"wire", "inference", "warehouse", "registry-dev", "servers", "gateway", "training", "local"},
    # the mesh CA: certificate files and identities, on which rpc, servers, gateway and the agent stand
    "pki": {"wire", "inference", "warehouse", "rpc", "registry", "registry-dev", "servers", "gateway", "training",
            "local", "queue", "jobs"},
}


@dataclass(frozen=True)
class Arrow:
    importer: str
    imported: str
    where: str  # path:line

    def __str__(self) -> str:
        return f"{self.where}: {self.importer} → {self.imported}"


def layer_of(module: str) -> str | None:
    best = None
    for layer, prefixes in LAYERS.items():
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (layer, len(prefix))
    return best[0] if best else None


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = [ROOMS[rel.parts[0]], *rel.parts[1:]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files() -> list[Path]:
    files = []
    for room in ROOMS:
        for path in sorted((ROOT / room).rglob("*.py")):
            if "v1" not in path.relative_to(ROOT).parts:  # generated stubs
                files.append(path)
    return files


def arrows() -> list[Arrow]:
    found = []
    for path in source_files():
        importer = module_name(path)
        package = importer if path.name == "__init__.py" else importer.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join([*base, node.module] if node.module else base)
                else:
                    module = node.module or ""
                # `from meshserve import telemetry` imports meshserve.telemetry
                targets = [f"{module}.{alias.name}" for alias in node.names] if module in ROOMS.values() else [module]
            where = f"{path.relative_to(ROOT)}:{node.lineno}" if targets else ""
            found.extend(Arrow(importer, t, where) for t in targets if t.startswith("meshserve"))
    return found


def test_the_source_tree_is_read() -> None:
    names = {module_name(p) for p in source_files()}
    # the rooms are all there, so a forbidden arrow cannot hide in a file this test skips
    for expected in ("meshserve.wire.tensors", "meshserve.inference.detector", "meshserve.rpc.process",
                     "meshserve.registry.dev.agent", "meshserve.servers.detector", "meshserve.gateway.photo_search",
                     "meshserve.training.detector", "meshserve.local.mesh"):  # fmt: skip
        assert expected in names
    assert len(arrows()) > 200


def test_no_forbidden_arrow() -> None:
    bad = [
        arrow
        for arrow in arrows()
        if (src := layer_of(arrow.importer)) in FORBIDDEN and layer_of(arrow.imported) in FORBIDDEN[src]
    ]
    assert not bad, "imports across the floor plan:\n" + "\n".join(map(str, bad))


@pytest.mark.parametrize(
    "importer, imported, forbidden",
    [
        ("meshserve.gateway.x", "meshserve.servers.images", True),
        ("meshserve.gateway.x", "meshserve.training.catalogue", True),
        ("meshserve.servers.x", "meshserve.training.detector", True),
        ("meshserve.registry.watch", "meshserve.gateway.routes", True),
        ("meshserve.registry.client", "meshserve.registry.dev.state", True),
        ("meshserve.training.datasets", "meshserve.local.supervisor", True),
        ("meshserve.wire.tensors", "meshserve.servers.model", True),
        ("meshserve.inference.detector", "meshserve.registry.config", True),
        ("meshserve.gateway.x", "meshserve.wire.tensors", False),
        ("meshserve.servers.x", "meshserve.inference.detector", False),
        ("meshserve.training.x", "meshserve.inference.detector", False),
        ("meshserve.local.x", "meshserve.training.detector", False),
        ("meshserve.gateway.enrich", "meshserve.warehouse", False),
        ("meshserve.warehouse", "meshserve.training.catalogue", True),
        ("meshserve.jobs.worker", "meshserve.gateway.photo_search", True),
        ("meshserve.jobs.worker", "meshserve.servers.model", True),
        ("meshserve.jobs.worker", "meshserve.queue.store", False),
        ("meshserve.gateway.jobs", "meshserve.queue.store", False),
        ("meshserve.gateway.jobs", "meshserve.jobs.worker", True),
        ("meshserve.queue.store", "meshserve.rpc.process", True),
        ("meshserve.pki.authority", "meshserve.rpc.process", True),
        ("meshserve.rpc.tls", "meshserve.pki.layout", False),
        ("meshserve.registry.dev.agent", "meshserve.pki.layout", False),
    ],
)
def test_the_rules_say_what_the_design_says(importer: str, imported: str, forbidden: bool) -> None:
    src, dst = layer_of(importer), layer_of(imported)
    assert (src in FORBIDDEN and dst in FORBIDDEN[src]) is forbidden


def test_training_commands_import_nothing_of_meshserve_at_load() -> None:
    """`meshserve` imports every command module to build its parser. The training room's command
    modules live in meshserve.training, so their module level stays free of meshserve imports:
    `meshserve serve detector` must load no training code through them."""
    heavy = []
    for path in source_files():
        if module_name(path).startswith("meshserve.training.") and path.name.endswith("cli.py"):
            for node in ast.parse(path.read_text()).body:
                if isinstance(node, ast.Import | ast.ImportFrom) and "meshserve" in ast.unparse(node):
                    heavy.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not heavy, "training command modules importing meshserve at module level: " + ", ".join(heavy)


def test_every_package_on_disk_is_installed() -> None:
    """A non-editable install (the Dockerfile's `pip install .`) ships only the listed packages."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {module_name(p) for p in source_files() if p.name == "__init__.py"} | {"meshserve.v1"}
    assert on_disk == listed
