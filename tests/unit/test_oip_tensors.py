"""OIP datatypes ↔ numpy (meshserve/wire/oip.py, oip_json.py): every datatype both ways, BYTES
length prefixes, typed contents, and the checks that name what was wrong."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from meshserve.errors import InvalidInput
from meshserve.oip import grpc_predict_v2_pb2 as pb
from meshserve.wire import oip, oip_json, tensors
from meshserve.wire.signature import BYTES, ParamSpec, Signature, TensorSpec

ALL = [("BOOL", np.bool_), ("UINT8", np.uint8), ("UINT16", np.uint16), ("UINT32", np.uint32),
       ("UINT64", np.uint64), ("INT8", np.int8), ("INT16", np.int16), ("INT32", np.int32),
       ("INT64", np.int64), ("FP16", np.float16), ("FP32", np.float32), ("FP64", np.float64)]  # fmt: skip


def sample(dtype: type) -> np.ndarray:
    values = np.array([[0, 1, 1], [1, 0, 1]]) if dtype is np.bool_ else np.array([[0, 1, 2], [3, 100, 127]])
    return values.astype(dtype)


@pytest.mark.parametrize("datatype, dtype", ALL)
def test_raw_form_round_trips_every_numeric_datatype(datatype: str, dtype: type) -> None:
    value = sample(dtype)
    assert oip.datatype_of_array(value) == datatype
    raw = bytes(oip.raw_content(value))
    assert raw == value.astype(np.dtype(dtype).newbyteorder("<")).tobytes()  # little-endian, row-major
    back = oip.decode_raw("inputs['x']", datatype, value.shape, raw)
    assert isinstance(back, np.ndarray) and back.dtype == value.dtype
    np.testing.assert_array_equal(back, value)


@pytest.mark.parametrize("datatype, dtype", [(d, t) for d, t in ALL if d != "FP16"])
def test_typed_form_decodes_every_datatype_that_has_one(datatype: str, dtype: type) -> None:
    value = sample(dtype)
    contents = pb.InferTensorContents()
    getattr(contents, oip.CONTENTS_FIELD[datatype]).extend(value.reshape(-1).tolist())
    back = oip.decode_typed("inputs['x']", datatype, value.shape, contents)
    assert isinstance(back, np.ndarray) and back.dtype == value.dtype
    np.testing.assert_array_equal(back, value)


def test_typed_form_refuses_out_of_range_values_and_the_wrong_field() -> None:
    with pytest.raises(InvalidInput, match=r"inputs\['x'\].contents.int_contents: values outside INT8"):
        oip.decode_typed("inputs['x']", "INT8", (1,), pb.InferTensorContents(int_contents=[200]))
    with pytest.raises(InvalidInput, match="belongs in fp32_contents"):
        oip.decode_typed("inputs['x']", "FP32", (1,), pb.InferTensorContents(fp64_contents=[1.0]))
    with pytest.raises(InvalidInput, match="FP16 has no typed form"):
        oip.decode_typed("inputs['x']", "FP16", (1,), pb.InferTensorContents(fp32_contents=[1.0]))


def test_bytes_elements_travel_behind_little_endian_lengths() -> None:
    elements = [b"a", b"", b"\x00\xff" * 300]
    raw = oip.serialize_bytes(elements)
    assert raw[:5] == struct.pack("<I", 1) + b"a"
    assert oip.deserialize_bytes("inputs['t']", raw, 3) == elements
    assert oip.decode_raw("inputs['t']", "BYTES", (3,), raw) == elements


@pytest.mark.parametrize(
    "raw, count, words",
    [
        (struct.pack("<I", 2) + b"ok" + b"\x01\x00", 2, "element 1 has a truncated length prefix (2 of 4 bytes)"),
        (struct.pack("<I", 9) + b"short", 1, "element 0 declares 9 bytes, only 5 remain"),
        (struct.pack("<I", 1) + b"a", 2, "1 elements, but the shape needs 2"),
        (struct.pack("<I", 1) + b"a" + struct.pack("<I", 0), 1, "4 bytes left after the 1 elements"),
    ],
)
def test_bad_bytes_tensors_name_the_tensor_and_element(raw: bytes, count: int, words: str) -> None:
    with pytest.raises(InvalidInput) as err:
        oip.deserialize_bytes("inputs['t'] raw_input_contents", raw, count)
    assert str(err.value).startswith("inputs['t']") and words in str(err.value)


def test_datatype_names_of_signature_dtypes_and_refusals() -> None:
    assert [oip.datatype_of(d) for d in ("float32", "float16", "int64", "uint8", "bool", BYTES)] == [
        "FP32", "FP16", "INT64", "UINT8", "BOOL", "BYTES"]  # fmt: skip
    with pytest.raises(InvalidInput, match=r"inputs\['x'\].datatype: 'FLOAT' is not an OIP datatype"):
        oip.check_datatype("inputs['x']", "FLOAT")
    with pytest.raises(InvalidInput, match="got BF16|not an OIP datatype"):
        oip.check_datatype("inputs['x']", "BF16")
    with pytest.raises(InvalidInput, match="31 bytes, but shape \\[2, 4\\] of FP32 needs 32"):
        oip.decode_raw("inputs['x']", "FP32", (2, 4), b"\0" * 31)


SIG = Signature(
    inputs=(TensorSpec("x", "float32", (-1, 2), max_shape=(4, 2)), TensorSpec("t", BYTES, (-1,), optional=True)),
    outputs=(TensorSpec("y", "float32", (-1, 2)),),
    parameters=(ParamSpec("k", int, 3, min=1, max=10), ParamSpec("s", float, 0.5)),
)


def test_request_parameters_map_onto_declared_ones() -> None:
    params = {"k": pb.InferParameter(uint64_param=7), "s": pb.InferParameter(int64_param=1),
              "priority": pb.InferParameter(uint64_param=1)}  # fmt: skip
    assert oip.decode_params(params, SIG) == {"k": 7, "s": 1.0}
    assert oip.decode_params({"s": pb.InferParameter(double_param=0.25)}, SIG) == {"k": 3, "s": 0.25}
    with pytest.raises(InvalidInput, match=r"parameters\['k'\]: 11 exceeds the maximum 10"):
        oip.decode_params({"k": pb.InferParameter(int64_param=11)}, SIG)
    with pytest.raises(InvalidInput, match=r"parameters\['k'\]: got string_param, expected int"):
        oip.decode_params({"k": pb.InferParameter(string_param="7")}, SIG)


def test_request_inputs_checked_against_the_signature() -> None:
    x = np.ones((3, 2), np.float32)
    request = pb.ModelInferRequest(inputs=[pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32",
                                                                                 shape=[3, 2])],
                                   raw_input_contents=[x.tobytes()])  # fmt: skip
    decoded = oip.decode_inputs(request, SIG)
    np.testing.assert_array_equal(decoded["x"], x)
    request.inputs[0].shape[:] = [5, 2]
    request.raw_input_contents[0] = np.ones((5, 2), np.float32).tobytes()
    with pytest.raises(InvalidInput, match=r"inputs\['x'\].shape\[0\]: 5 exceeds the maximum 4"):
        oip.decode_inputs(request, SIG)


@pytest.mark.parametrize("rows", [3, 40_000])  # a small message, and parts straight from the arrays
def test_reply_serialises_outputs_in_raw_form(rows: int) -> None:
    y = np.arange(rows * 2, dtype=np.float32).reshape(rows, 2)
    reply = oip.reply(pb.ModelInferResponse(model_name="m", id="7"), {"y": y, "names": [b"ab", b"c"]})
    assert isinstance(reply, tensors.Reply) == (y.nbytes >= tensors.REPLY_PARTS_FROM)
    message = pb.ModelInferResponse.FromString(tensors.serialize_reply(reply))
    assert [(o.name, o.datatype, list(o.shape)) for o in message.outputs] == [("y", "FP32", [rows, 2]),
                                                                              ("names", "BYTES", [2])]
    assert message.raw_output_contents[0] == y.tobytes()
    assert message.raw_output_contents[1] == oip.serialize_bytes([b"ab", b"c"])
    assert (message.model_name, message.id) == ("m", "7")


def test_rest_body_with_binary_tensors_becomes_the_same_raw_request() -> None:
    x = np.arange(4, dtype=np.float32).reshape(2, 2)
    head = json.dumps({"inputs": [
        {"name": "x", "datatype": "FP32", "shape": [2, 2], "parameters": {"binary_data_size": 16}},
        {"name": "t", "datatype": "BYTES", "shape": [2], "data": ["é", "b"]},
    ], "parameters": {"k": 4, "s": 0.5, "binary_data_output": True}}).encode()  # fmt: skip
    request = oip_json.parse_request(head + x.tobytes(), str(len(head)), "m", "")
    assert list(request.raw_input_contents) == [x.tobytes(), oip.serialize_bytes(["é".encode(), b"b"])]
    assert oip.decode_params(request.parameters, SIG) == {"k": 4, "s": 0.5}
    body, json_length = oip_json.response_body(request, "m", "1", {"y": x})
    assert json_length is not None and body[json_length:] == x.tobytes()
    assert json.loads(body[:json_length])["outputs"][0]["parameters"] == {"binary_data_size": 16}
    with pytest.raises(InvalidInput, match=r"inputs\['x'\].data: values outside INT8"):
        oip_json.parse_request(json.dumps({"inputs": [{"name": "x", "datatype": "INT8", "shape": [1],
                                                       "data": [300]}]}).encode(), None, "m", "")  # fmt: skip
    with pytest.raises(InvalidInput, match="does not fit"):
        oip_json.parse_request(head + x.tobytes()[:8], str(len(head)), "m", "")
