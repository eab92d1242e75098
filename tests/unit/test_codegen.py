"""The committed stubs in meshserve/v1/ are exactly what codegen makes from protos/ today."""

from __future__ import annotations

import importlib
from pathlib import Path

from meshserve import codegen


def test_committed_stubs_match_protos(tmp_path: Path) -> None:
    fresh = codegen.generate(tmp_path)
    committed = codegen.generated_files(codegen.REPO_ROOT)
    fresh_names = [p.name for p in fresh]
    assert fresh_names == [p.name for p in committed], "stub files added or removed: run codegen"
    stale = [
        p.name
        for p in fresh
        if p.read_bytes() != (codegen.REPO_ROOT / codegen.PROTO_PACKAGE / p.name).read_bytes()
    ]
    assert not stale, f"stubs drifted from protos/: {stale}; run `python -m meshserve.codegen`"
    assert len(fresh_names) == 3 * len(codegen.proto_files())


def test_stubs_import_as_meshserve_v1() -> None:
    for proto in codegen.proto_files():
        stem = proto.stem
        module = importlib.import_module(f"meshserve.v1.{stem}_pb2")
        assert module.DESCRIPTOR.package == "meshserve.v1"
        importlib.import_module(f"meshserve.v1.{stem}_pb2_grpc")
    from meshserve.v1 import prediction_pb2_grpc

    assert hasattr(prediction_pb2_grpc, "PredictionServiceStub")
