"""The REST form of Open Inference Protocol v2 bodies: JSON tensors and the binary tensor extension.

A request body becomes a ModelInferRequest with every input in raw form, so the REST form is
checked and decoded by meshserve/wire/oip.py exactly as the gRPC form is. Outputs go back as
JSON `data`, or as binary after the JSON (Triton's extension, tritonclient's default) when
asked: `binary_data` on an output, `binary_data_output` on the request.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from meshserve.errors import InvalidInput
from meshserve.oip import grpc_predict_v2_pb2 as oip_pb2
from meshserve.wire import oip
from meshserve.wire.signature import Array

HEADER_LENGTH = "Inference-Header-Content-Length"  # bytes of JSON before the binary tensors


def parse_request(body: bytes, header_length: str | None, name: str, version: str) -> oip_pb2.ModelInferRequest:
    """An infer body (JSON, then binary tensors when `header_length` says where the JSON ends)."""
    if header_length is None:
        head, binary = body, b""
    else:
        try:
            cut = int(header_length)
        except ValueError:
            raise InvalidInput(f"{HEADER_LENGTH}: {header_length!r} is not a number") from None
        if not 0 <= cut <= len(body):
            raise InvalidInput(f"{HEADER_LENGTH}: {cut} is outside the body of {len(body)} bytes")
        head, binary = body[:cut], body[cut:]
    try:
        doc = json.loads(head)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"body: not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise InvalidInput("body: expected a JSON object with 'inputs'")
    request = oip_pb2.ModelInferRequest(model_name=name, model_version=version, id=str(doc.get("id", "")))
    for key, value in _object(doc.get("parameters"), "parameters").items():
        _set_parameter(request.parameters[key], value, f"parameters[{key!r}]")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInput("inputs: expected a non-empty list of tensors")
    offset = 0
    for i, tensor in enumerate(inputs):
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise InvalidInput(f"inputs[{i}]: expected an object with a 'name'")
        field = f"inputs[{tensor['name']!r}]"
        datatype = tensor.get("datatype")
        if not isinstance(datatype, str):
            raise InvalidInput(f"{field}.datatype: missing")
        oip.check_datatype(field, datatype)
        shape = tensor.get("shape")
        if not isinstance(shape, list) or not all(type(d) is int for d in shape):
            raise InvalidInput(f"{field}.shape: expected a list of integers")
        params = _object(tensor.get("parameters"), f"{field}.parameters")
        size = params.get("binary_data_size")
        if size is not None:
            if type(size) is not int or size < 0 or offset + size > len(binary):
                raise InvalidInput(f"{field}.parameters['binary_data_size']: {size!r} does not fit the "
                                   f"{len(binary) - offset} binary bytes left")  # fmt: skip
            raw = binary[offset : offset + size]
            offset += size
        elif "data" in tensor:
            raw = _raw_from_json(field, datatype, shape, tensor["data"])
        else:
            raise InvalidInput(f"{field}: no data (neither 'data' nor parameters.binary_data_size)")
        request.inputs.add(name=tensor["name"], datatype=datatype, shape=shape)
        request.raw_input_contents.append(raw)
    if offset != len(binary):
        raise InvalidInput(f"body: {len(binary) - offset} binary bytes after the last input's data")
    for i, output in enumerate(doc.get("outputs") or []):
        if not isinstance(output, dict) or not isinstance(output.get("name"), str):
            raise InvalidInput(f"outputs[{i}]: expected an object with a 'name'")
        requested = request.outputs.add(name=output["name"])
        binary_flag = _object(output.get("parameters"), f"outputs[{output['name']!r}].parameters").get("binary_data")
        if isinstance(binary_flag, bool):
            requested.parameters["binary_data"].bool_param = binary_flag
    return request


def binary_outputs(request: oip_pb2.ModelInferRequest) -> tuple[bool, dict[str, bool]]:
    """Which outputs go back as binary: the request's `binary_data_output` (default for all), and
    each requested output's own `binary_data` where it says."""
    params = request.parameters
    default = "binary_data_output" in params and params["binary_data_output"].bool_param
    chosen = {}
    for output in request.outputs:
        if "binary_data" in output.parameters:
            chosen[output.name] = output.parameters["binary_data"].bool_param
    return default, chosen


def response_body(
    request: oip_pb2.ModelInferRequest, model_name: str, model_version: str, outputs: Mapping[str, Array]
) -> tuple[bytes, int | None]:
    """The JSON reply and, when any output is binary, the JSON's length (the binary follows it)."""
    default, chosen = binary_outputs(request)
    described = []
    blobs: list[bytes] = []
    for name, value in outputs.items():
        shape = [len(value)] if isinstance(value, list) else list(value.shape)
        entry: dict[str, Any] = {"name": name, "datatype": oip.datatype_of_array(value), "shape": shape}
        if chosen.get(name, default):
            blob = bytes(oip.raw_content(value))
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = _json_data(name, value)
        described.append(entry)
    reply: dict[str, Any] = {"model_name": model_name, "model_version": model_version, "outputs": described}
    if request.id:
        reply["id"] = request.id
    head = json.dumps(reply).encode()
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)


def _json_data(name: str, value: Array) -> list[Any]:
    if not isinstance(value, list):
        return value.reshape(-1).tolist()
    try:
        return [bytes(e).decode("utf-8") for e in value]
    except UnicodeDecodeError:
        raise InvalidInput(f"outputs[{name!r}]: not UTF-8, so not JSON; ask for it with binary_data") from None


def _raw_from_json(field: str, datatype: str, shape: list[int], data: Any) -> bytes:
    """JSON `data` (flat or nested, row-major) as the raw form of `datatype`."""
    count = math.prod(shape) if all(d >= 0 for d in shape) else -1
    if datatype == "BYTES":
        flat = np.asarray(data, dtype=object).reshape(-1) if isinstance(data, list) else None
        if flat is None or not all(isinstance(e, str) for e in flat):
            raise InvalidInput(f"{field}.data: BYTES data must be a list of strings")
        if flat.size != count:
            raise InvalidInput(f"{field}.data: {flat.size} values, but shape {shape} needs {count}")
        return oip.serialize_bytes([e.encode("utf-8") for e in flat])
    if datatype not in oip.NUMERIC:
        raise InvalidInput(f"{field}.data: {datatype} cannot travel as JSON; send it as binary")
    dtype = oip.NUMERIC[datatype]
    try:
        loose = np.asarray(data)
    except ValueError:
        raise InvalidInput(f"{field}.data: ragged or not numbers") from None
    allowed = {"b": "b", "u": "iu", "i": "iu", "f": "iuf"}[dtype.kind]
    if loose.size and loose.dtype.kind not in allowed:
        raise InvalidInput(f"{field}.data: values of kind {loose.dtype.kind!r} do not fit {datatype}")
    if loose.size != count:
        raise InvalidInput(f"{field}.data: {loose.size} values, but shape {shape} needs {count}")
    if dtype.kind in "iu" and loose.size:
        info = np.iinfo(dtype)
        if int(loose.min()) < info.min or int(loose.max()) > info.max:
            raise InvalidInput(f"{field}.data: values outside {datatype}'s range {info.min}..{info.max}")
    return loose.astype(dtype).tobytes()


def _object(value: Any, field: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{field}: expected a JSON object")
    return value


def _set_parameter(out: oip_pb2.InferParameter, value: Any, field: str) -> None:
    if isinstance(value, bool):
        out.bool_param = value
    elif isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise InvalidInput(f"{field}: {value} does not fit int64")
        out.int64_param = value
    elif isinstance(value, float):
        out.double_param = value
    elif isinstance(value, str):
        out.string_param = value
    else:
        raise InvalidInput(f"{field}: expected a boolean, number or string")
