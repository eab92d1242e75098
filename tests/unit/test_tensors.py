"""Protobuf ↔ numpy conversion and request checks against a signature."""

from __future__ import annotations

import numpy as np
import pytest

from meshserve.errors import InvalidInput
from meshserve.v1 import prediction_pb2, tensor_pb2
from meshserve.wire import tensors
from meshserve.wire.signature import NUMERIC_DTYPES, ParamSpec, Signature, TensorSpec

SIG = Signature(
    inputs=(
        TensorSpec("image", "bytes", (-1,), max_shape=(4,), max_element_bytes=10),
        TensorSpec("boxes", "float32", (-1, 4), max_shape=(4, 0)),
    ),
    outputs=(TensorSpec("emb", "float16", (-1, 8)),),
    parameters=(
        ParamSpec("k", int, 10, min=1, max=100),
        ParamSpec("threshold", float, 0.5, min=0.0, max=1.0),
        ParamSpec("explain", bool, False),
    ),
)


@pytest.mark.parametrize("dtype", NUMERIC_DTYPES)
def test_every_numeric_dtype_round_trips_little_endian(dtype: str) -> None:
    value = (np.arange(24) % 7).astype(dtype).reshape(2, 3, 4)
    msg = tensors.tensor_from(value)
    assert msg.content == value.astype(np.dtype(dtype).newbyteorder("<")).tobytes()
    back = tensors.array_from(tensor_pb2.Tensor.FromString(msg.SerializeToString()))
    assert isinstance(back, np.ndarray)
    np.testing.assert_array_equal(back, value)
    assert back.dtype == np.dtype(dtype)


def test_big_endian_input_is_sent_little_endian() -> None:
    value = np.array([[1.5, -2.0]], dtype=">f4")
    msg = tensors.tensor_from(value)
    assert msg.content == np.array([[1.5, -2.0]], "<f4").tobytes()


def test_decode_inputs_accepts_a_valid_request() -> None:
    boxes = np.zeros((2, 4), np.float32)
    inputs = tensors.decode_inputs(
        {"image": tensors.tensor_from([b"jpg1", b"jpg2"]), "boxes": tensors.tensor_from(boxes)},
        SIG,
    )
    assert inputs["image"] == [b"jpg1", b"jpg2"]
    np.testing.assert_array_equal(inputs["boxes"], boxes)


@pytest.mark.parametrize(
    "tensor, words",
    [
        (tensors.tensor_from(np.zeros((2, 3), np.float32)), "inputs['boxes'].shape[1]: got 3"),
        (tensors.tensor_from(np.zeros((5, 4), np.float32)), "exceeds the maximum 4"),
        (tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[2, 4], content=b"x",
                           elements=[]), "1 bytes"),
        (tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[1, 4], content=b"\0" * 16,
                           elements=[b"x"]), "only BYTES tensors use elements"),
    ],
)  # fmt: skip
def test_numeric_input_problems_name_the_field(tensor: tensor_pb2.Tensor, words: str) -> None:
    with pytest.raises(InvalidInput, match=words.replace("[", r"\[").replace("]", r"\]")):
        tensors.decode_inputs({"boxes": tensor, "image": tensors.tensor_from([b"a"])}, SIG)


@pytest.mark.parametrize(
    "tensor, words",
    [
        (tensors.tensor_from([b"a" * 11]), "11 bytes exceeds the maximum 10"),
        (tensors.tensor_from([b""]), "empty"),
        (tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_BYTES, shape=[1], content=b"abc"),
         "carry their data in elements"),
        (tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_BYTES, shape=[5], elements=[b"a"] * 5),
         "exceeds the maximum 4"),
    ],
)  # fmt: skip
def test_bytes_input_problems_name_the_field(tensor: tensor_pb2.Tensor, words: str) -> None:
    with pytest.raises(InvalidInput, match="inputs\\['image'\\]") as info:
        tensors.decode_inputs({"image": tensor, "boxes": tensors.tensor_from(np.zeros((1, 4), "f4"))}, SIG)
    assert words in str(info.value)


def _params(**values: prediction_pb2.ParameterValue):
    return tensors.decode_params(values, SIG)


def test_params_get_defaults_types_and_bounds() -> None:
    assert _params() == {"k": 10, "threshold": 0.5, "explain": False}
    got = _params(k=prediction_pb2.ParameterValue(int_value=3),
                  threshold=prediction_pb2.ParameterValue(int_value=1))  # fmt: skip
    assert got["k"] == 3 and got["threshold"] == 1.0 and isinstance(got["threshold"], float)
    bad = [
        ({"k": prediction_pb2.ParameterValue(int_value=0)}, "below the minimum"),
        ({"k": prediction_pb2.ParameterValue(double_value=3.0)}, "expected int"),
        ({"k": prediction_pb2.ParameterValue(bool_value=True)}, "expected int"),
        ({"threshold": prediction_pb2.ParameterValue(double_value=float("nan"))}, "not finite"),
        ({"threshold": prediction_pb2.ParameterValue(double_value=1.5)}, "exceeds the maximum"),
        ({"k": prediction_pb2.ParameterValue()}, "no value set"),
        ({"nope": prediction_pb2.ParameterValue(int_value=1)}, "unknown parameter"),
    ]
    for values, words in bad:
        with pytest.raises(InvalidInput, match=words):
            tensors.decode_params(values, SIG)


def test_metadata_messages_describe_the_signature() -> None:
    spec = tensors.spec_message(SIG.inputs[0])
    assert (spec.name, spec.dtype, list(spec.shape), spec.max_element_bytes) == (
        "image", tensor_pb2.DATA_TYPE_BYTES, [-1], 10
    )  # fmt: skip
    k = tensors.param_spec_message(SIG.parameters[0])
    assert (k.name, k.kind, k.min, k.max, k.default.int_value) == (
        "k", prediction_pb2.ParameterSpec.KIND_INT, 1, 100, 10
    )  # fmt: skip


def test_a_reply_serialises_to_the_same_message_as_encode_tensor() -> None:
    decoded = tensors.decode_tensor(
        tensors.tensor_from(np.arange(6, dtype=np.float32).reshape(2, 3)),
        TensorSpec("x", "float32", (-1, 3)),
    )
    big = np.random.default_rng(0).standard_normal((3, 70_000)).astype(np.float32)  # 3-byte varints
    cases: list[dict[str, tensors.Array]] = [
        {},
        {"y": decoded},  # a read-only view of request bytes, passed through
        {"y": big, "tag": [b"a", b"bc", b"\x00" * 300]},
        {"y": big, "t": np.arange(12, dtype=np.int64).reshape(3, 4).T, "b": np.arange(4, dtype=">i4")},
        {"t": np.arange(12, dtype=np.int64).reshape(3, 4).T},  # not C-contiguous
        {"b": np.arange(4, dtype=">i4")},  # big-endian: converted to little-endian
        {"m": np.array([True, False]), "h": np.ones((1, 2), np.float16), "s": np.array(2.5)},
        {"e": np.zeros((1, 0), np.float32)},  # no bytes at all
    ]
    for outputs in cases:
        header = prediction_pb2.PredictResponse(model_name="m", model_version="7", request_id="r-1")
        expected = prediction_pb2.PredictResponse()
        expected.CopyFrom(header)
        for name, value in outputs.items():
            tensors.encode_tensor(value, expected.outputs[name])
        got = tensors.reply(header, outputs)
        message = got.message() if isinstance(got, tensors.Reply) else got
        assert message == expected
        assert prediction_pb2.PredictResponse.FromString(tensors.serialize_reply(got)) == expected
        assert isinstance(got, tensors.Reply) == (outputs.get("y") is big)  # only large replies
    with pytest.raises(TypeError, match="complex64"):
        tensors.reply(header, {"c": np.zeros(2, np.complex64)})
    with pytest.raises(TypeError, match="complex64"):
        tensors.reply(header, {"y": big, "c": np.zeros(2, np.complex64)})
