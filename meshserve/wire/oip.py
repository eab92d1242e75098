"""Open Inference Protocol v2 tensors ↔ numpy: datatypes, both input forms, raw outputs, parameters.

An OIP request is checked against the model's signature with the same rules as a Predict request
(meshserve/wire/tensors.py), so both reach the model as the same arrays; every check raises
InvalidInput naming the tensor, e.g. `inputs['x'].datatype`.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence

import numpy as np

from meshserve.errors import InvalidInput
from meshserve.oip import grpc_predict_v2_pb2 as oip_pb2
from meshserve.wire import tensors
from meshserve.wire.signature import BYTES, Array, Arrays, ParamValue, Signature, TensorSpec

# OIP datatype → numpy dtype, little-endian on the wire whatever the host order.
NUMERIC: dict[str, np.dtype] = {
    name: np.dtype(np_name).newbyteorder("<")
    for name, np_name in (
        ("BOOL", "bool"), ("UINT8", "uint8"), ("UINT16", "uint16"), ("UINT32", "uint32"),
        ("UINT64", "uint64"), ("INT8", "int8"), ("INT16", "int16"), ("INT32", "int32"),
        ("INT64", "int64"), ("FP16", "float16"), ("FP32", "float32"), ("FP64", "float64"),
    )
}  # fmt: skip
DATATYPES = (*NUMERIC, "BYTES")
_BY_NUMPY_NAME = {dtype.name: name for name, dtype in NUMERIC.items()}
_BY_DTYPE = {dtype: name for name, dtype in NUMERIC.items()}  # fast path: dtype.name is slow
# which InferTensorContents field carries each datatype's typed form (FP16 has none)
CONTENTS_FIELD = {
    "BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
    "UINT32": "uint_contents", "UINT64": "uint64_contents", "INT8": "int_contents",
    "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}  # fmt: skip
_LENGTH = struct.Struct("<I")  # the prefix of each BYTES element in the raw form
# Parameters the protocol itself defines (Triton's sequence batching, priority, HTTP's binary
# extension, shared memory on inputs): not model parameters, so never refused as unknown.
PROTOCOL_PARAMETERS = frozenset({
    "sequence_id", "sequence_start", "sequence_end", "priority", "timeout",
    "binary_data_output", "binary_data", "binary_data_size",
})  # fmt: skip
_RAW_OUTPUT = b"\x32"  # ModelInferResponse.raw_output_contents: field 6, length-delimited


def datatype_of(dtype: str) -> str:
    """The OIP datatype of a signature dtype ("float32" → "FP32", "bytes" → "BYTES")."""
    return "BYTES" if dtype == BYTES else _BY_NUMPY_NAME[dtype]


def datatype_of_array(value: Array) -> str:
    if isinstance(value, list):
        return "BYTES"
    name = _BY_DTYPE.get(value.dtype) or _BY_NUMPY_NAME.get(value.dtype.name)
    if name is None:
        raise TypeError(f"no OIP datatype for numpy dtype {value.dtype}")
    return name


# -- BYTES elements -----------------------------------------------------------------------


def serialize_bytes(elements: Sequence[bytes]) -> bytes:
    """BYTES elements in the raw form: each behind its 4-byte little-endian length."""
    return b"".join(_LENGTH.pack(len(e)) + bytes(e) for e in elements)


def deserialize_bytes(field: str, raw: bytes | memoryview, count: int) -> list[bytes]:
    """Exactly `count` length-prefixed elements filling `raw`, or InvalidInput saying where not."""
    view = memoryview(raw)
    out: list[bytes] = []
    at = 0
    while at < len(view):
        if len(out) == count:
            raise InvalidInput(f"{field}: {len(view) - at} bytes left after the {count} elements the shape needs")
        if at + 4 > len(view):
            raise InvalidInput(f"{field}: element {len(out)} has a truncated length prefix "
                               f"({len(view) - at} of 4 bytes)")  # fmt: skip
        (size,) = _LENGTH.unpack_from(view, at)
        at += 4
        if at + size > len(view):
            raise InvalidInput(f"{field}: element {len(out)} declares {size} bytes, only {len(view) - at} remain")
        out.append(bytes(view[at : at + size]))
        at += size
    if len(out) != count:
        raise InvalidInput(f"{field}: {len(out)} elements, but the shape needs {count}")
    return out


# -- one input ----------------------------------------------------------------------------


def check_datatype(field: str, datatype: str, spec: TensorSpec | None = None) -> None:
    if datatype not in DATATYPES:
        raise InvalidInput(f"{field}.datatype: {datatype!r} is not an OIP datatype ({', '.join(DATATYPES)})")
    if spec is not None and datatype != datatype_of(spec.dtype):
        raise InvalidInput(f"{field}.datatype: got {datatype}, expected {datatype_of(spec.dtype)}")


def decode_raw(field: str, datatype: str, shape: tuple[int, ...], raw: bytes) -> Array:
    """The raw form of one tensor whose datatype and shape were checked: a read-only array viewing
    `raw` (no copy, as Predict's), or the list of BYTES elements."""
    count = math.prod(shape)
    if datatype == "BYTES":
        return deserialize_bytes(f"{field} raw_input_contents", raw, count)
    dtype = NUMERIC[datatype]
    if len(raw) != count * dtype.itemsize:
        raise InvalidInput(f"{field} raw_input_contents: {len(raw)} bytes, but shape {list(shape)} of "
                           f"{datatype} needs {count * dtype.itemsize}")  # fmt: skip
    value = np.frombuffer(raw, dtype=dtype).reshape(shape)
    if datatype == "BOOL" and count and int(np.frombuffer(raw, np.uint8).max()) > 1:
        raise InvalidInput(f"{field} raw_input_contents: BOOL bytes must be 0 or 1")
    return value


def decode_typed(field: str, datatype: str, shape: tuple[int, ...], contents: oip_pb2.InferTensorContents) -> Array:
    """The typed form of one tensor: the contents field of its datatype, range-checked."""
    count = math.prod(shape)
    name = CONTENTS_FIELD.get(datatype)
    if name is None:
        raise InvalidInput(f"{field}.contents: {datatype} has no typed form; send it in raw_input_contents")
    values = getattr(contents, name)
    others = [f for f in set(CONTENTS_FIELD.values()) - {name} if len(getattr(contents, f))]
    if others:
        raise InvalidInput(f"{field}.contents: {datatype} data belongs in {name}, not {sorted(others)}")
    if len(values) != count:
        raise InvalidInput(f"{field}.contents.{name}: {len(values)} values, but shape {list(shape)} needs {count}")
    if datatype == "BYTES":
        return list(values)
    dtype = NUMERIC[datatype]
    if dtype.kind in "iu" and dtype.itemsize < 8 and count:
        wide = np.array(values, dtype=np.int64)
        info = np.iinfo(dtype)
        if int(wide.min()) < info.min or int(wide.max()) > info.max:
            raise InvalidInput(f"{field}.contents.{name}: values outside {datatype}'s range {info.min}..{info.max}")
        return wide.astype(dtype).reshape(shape)
    return np.array(values, dtype=dtype).reshape(shape)


# -- a request ----------------------------------------------------------------------------


def decode_inputs(request: oip_pb2.ModelInferRequest, signature: Signature) -> Arrays:
    """Every input of a ModelInferRequest checked against the signature and decoded; one batch size."""
    inputs = request.inputs
    raws = request.raw_input_contents
    if not inputs:
        raise InvalidInput("inputs: empty; expected " + ", ".join(repr(s.name) for s in signature.inputs))
    if raws and len(raws) != len(inputs):
        raise InvalidInput(f"raw_input_contents: {len(raws)} entries for {len(inputs)} inputs; "
                           "send one per input, in the order of inputs")  # fmt: skip
    decoded: Arrays = {}
    batch = -1
    for i, tensor in enumerate(inputs):
        name = tensor.name
        field = f"inputs[{name!r}]"
        if name in decoded:
            raise InvalidInput(f"{field}: given twice")
        spec = signature.input(name)
        if spec is None:
            known = ", ".join(repr(s.name) for s in signature.inputs)
            raise InvalidInput(f"{field}: unknown input; expected {known}")
        for key in tensor.parameters:
            if key.startswith("shared_memory"):
                raise InvalidInput(f"{field}.parameters[{key!r}]: shared memory is not supported; send the data")
        check_datatype(field, tensor.datatype, spec)
        shape = tuple(tensor.shape)
        tensors.check_shape(field, shape, spec)
        has_typed = tensor.HasField("contents")
        if raws:
            if has_typed:
                raise InvalidInput(f"{field}: both contents and raw_input_contents are set; send one form")
            value = decode_raw(field, tensor.datatype, shape, raws[i])
        elif has_typed:
            value = decode_typed(field, tensor.datatype, shape, tensor.contents)
        else:
            raise InvalidInput(f"{field}: no data (neither contents nor raw_input_contents)")
        if isinstance(value, list):
            tensors.check_elements(field, value, spec)
        n = len(value) if isinstance(value, list) else value.shape[0]
        if batch == -1:
            batch = n
        elif n != batch:
            raise InvalidInput(f"{field}.shape[0]: batch size {n} differs from the other inputs ({batch})")
        decoded[name] = value
    for spec in signature.inputs:
        if not spec.optional and spec.name not in decoded:
            raise InvalidInput(f"inputs[{spec.name!r}]: missing required input")
    return decoded


def decode_params(params: Mapping[str, oip_pb2.InferParameter], signature: Signature) -> dict[str, ParamValue]:
    """Request parameters onto the model's declared ones, defaults filled in; the protocol's own
    (PROTOCOL_PARAMETERS) are left to the protocol, any other unknown name is refused."""
    out: dict[str, ParamValue] = {}
    for name in params:  # not .items(): a protobuf map's items() is a pure-Python view
        spec = signature.param(name)
        if spec is None:
            if name in PROTOCOL_PARAMETERS:
                continue
            known = ", ".join(p.name for p in signature.parameters) or "none"
            raise InvalidInput(f"parameters[{name!r}]: unknown parameter; accepted: {known}")
        value = params[name]
        which = value.WhichOneof("parameter_choice")
        if which is None:
            raise InvalidInput(f"parameters[{name!r}]: no value set")
        out[name] = tensors.check_param(f"parameters[{name!r}]", which, getattr(value, which), spec)
    for spec in signature.parameters:
        out.setdefault(spec.name, spec.default)
    return out


def requested_outputs(request: oip_pb2.ModelInferRequest, signature: Signature) -> list[str] | None:
    """The outputs asked for, in the order asked (None: all), each one the model has."""
    if not request.outputs:
        return None
    known = [spec.name for spec in signature.outputs]
    names = []
    for output in request.outputs:
        if output.name not in known:
            raise InvalidInput(f"outputs[{output.name!r}]: unknown output; known {known}")
        if output.name not in names:
            names.append(output.name)
    return names


# -- replies and metadata -----------------------------------------------------------------


def raw_content(value: Array, datatype: str | None = None) -> bytes | memoryview:
    """One output in the raw form: BYTES length-prefixed; numbers little-endian, row-major,
    uncopied when the array already is."""
    if isinstance(value, list):
        return serialize_bytes(value)
    dtype = NUMERIC[datatype or datatype_of_array(value)]
    if value.dtype != dtype:
        value = value.astype(dtype)
    if value.nbytes == 0:
        return b""
    return np.ascontiguousarray(value).reshape(-1).view(np.uint8).data


def reply(
    header: oip_pb2.ModelInferResponse, outputs: Mapping[str, Array]
) -> tensors.Reply | oip_pb2.ModelInferResponse:
    """`header` (names, id) plus one InferOutputTensor and one raw_output_contents entry per output,
    in the same order. Large contents go out as parts, copied once on serialisation; small ones
    in the message, where copies cost less than the Python that avoids them (as tensors.reply)."""
    raw: list[bytes | memoryview] = []
    for name, value in outputs.items():
        datatype = datatype_of_array(value)
        shape = [len(value)] if isinstance(value, list) else list(value.shape)
        header.outputs.add(name=name, datatype=datatype, shape=shape)
        raw.append(raw_content(value, datatype))
    if sum(len(content) for content in raw) < tensors.REPLY_PARTS_FROM:
        header.raw_output_contents.extend(bytes(content) for content in raw)
        return header
    parts: list[bytes | memoryview] = [header.SerializeToString()]
    for content in raw:
        parts.append(_RAW_OUTPUT + tensors.varint(len(content)))
        if len(content):
            parts.append(content)
    return tensors.Reply(parts)


def model_metadata(name: str, version: str, platform: str, signature: Signature) -> oip_pb2.ModelMetadataResponse:
    def describe(spec: TensorSpec) -> oip_pb2.ModelMetadataResponse.TensorMetadata:
        return oip_pb2.ModelMetadataResponse.TensorMetadata(
            name=spec.name, datatype=datatype_of(spec.dtype), shape=list(spec.shape)
        )

    return oip_pb2.ModelMetadataResponse(
        name=name,
        versions=[version],
        platform=platform,
        inputs=[describe(s) for s in signature.inputs],
        outputs=[describe(s) for s in signature.outputs],
    )
