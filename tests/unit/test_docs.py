"""Docs in the repo: the architecture page exists, and every document the code cites is here."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCE_DIRS = ("meshserve", "registry", "servers", "gateway", "training", "bench", "deploy", "tests")
CITED_DOC = re.compile(r"[\w./-]*[\w-]\.md\b")


def cited_docs() -> dict[str, list[str]]:
    """document path as cited → where ("file:line")"""
    cited: dict[str, list[str]] = {}
    for folder in SOURCE_DIRS:
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix not in (".py", ".yaml", ".yml", ".toml") and path.name != "Dockerfile":
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                for doc in CITED_DOC.findall(line):
                    cited.setdefault(doc, []).append(f"{path.relative_to(ROOT)}:{number}")
    return cited


def exists(doc: str, cited_in: str) -> bool:
    here = (ROOT / cited_in.split(":")[0]).parent
    return (ROOT / doc).is_file() or (here / doc).is_file()


def test_the_architecture_page_names_every_layer() -> None:
    page = (ROOT / "docs/architecture.md").read_text()
    for layer in ("meshserve.wire", "meshserve.inference", "meshserve.rpc", "meshserve.registry.dev",
                  "meshserve.servers", "meshserve.gateway", "meshserve.training"):  # fmt: skip
        assert f"`{layer}`" in page


def test_code_cites_only_documents_in_the_repo() -> None:
    cited = cited_docs()
    assert "docs/architecture.md" in cited  # the scan finds citations at all
    missing = {doc: where for doc, where in cited.items() if not any(exists(doc, w) for w in where)}
    assert not missing, f"documents cited but not in the repository: {missing}"
