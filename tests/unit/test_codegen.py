"""The committed stubs in meshserve/v1/ and meshserve/oip/ are exactly what codegen makes from protos/ today."""

from __future__ import annotations

import importlib
from pathlib import Path

from meshserve import codegen


def test_committed_stubs_match_protos(tmp_path: Path) -> None:
    fresh = codegen.generate(tmp_path)
    committed = codegen.generated_files(codegen.REPO_ROOT)
    fresh_names = [str(p.relative_to(tmp_path)) for p in fresh]
    committed_names = [str(p.relative_to(codegen.REPO_ROOT)) for p in committed]
    assert fresh_names == committed_names, "stub files added or removed: run codegen"
    stale = [name for name in fresh_names if (tmp_path / name).read_bytes() != (codegen.REPO_ROOT / name).read_bytes()]
    assert not stale, f"stubs drifted from protos/: {stale}; run `python -m meshserve.codegen`"
    assert len(fresh_names) == 3 * len(codegen.proto_files())


def test_stubs_import_as_meshserve_v1() -> None:
    for proto in codegen.proto_files():
        if proto.parent != codegen.PROTO_PACKAGE:
            continue
        stem = proto.stem
        module = importlib.import_module(f"meshserve.v1.{stem}_pb2")
        assert module.DESCRIPTOR.package == "meshserve.v1"
        importlib.import_module(f"meshserve.v1.{stem}_pb2_grpc")
    from meshserve.v1 import prediction_pb2_grpc

    assert hasattr(prediction_pb2_grpc, "PredictionServiceStub")


def test_oip_stubs_keep_the_inference_package() -> None:
    """Triton and KServe clients call /inference.GRPCInferenceService/…: the package name is the contract."""
    from meshserve.oip import grpc_predict_v2_pb2, grpc_predict_v2_pb2_grpc

    assert grpc_predict_v2_pb2.DESCRIPTOR.package == "inference"
    service = grpc_predict_v2_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    assert hasattr(grpc_predict_v2_pb2_grpc, "GRPCInferenceServiceStub")
    param = grpc_predict_v2_pb2.InferParameter.DESCRIPTOR.fields_by_name
    assert (param["double_param"].number, param["uint64_param"].number) == (4, 5)
    request = grpc_predict_v2_pb2.ModelInferRequest.DESCRIPTOR.fields_by_name
    assert request["raw_input_contents"].number == 7
