"""Drives a meshserve model server with the unmodified tritonclient (grpc and http); prints JSON.

Runs in its own virtual environment (tritonclient pins protobuf and grpcio that meshserve cannot
share; see tests/tritonclient_env.py), so it imports nothing of meshserve.

    python oip_tritonclient.py JOB.json

JOB: {"grpc": "host:port", "http": "host:port", "model": name, "parameters": {...},
      "inputs": [{"name", "datatype", "dtype", "shape", "raw"|"elements"}]}  (base64)
Out: {"grpc"|"http": {"live", "ready", "model_ready", "metadata", "outputs": {name: tensor}}}
"""

from __future__ import annotations

import base64
import json
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient


def array_of(spec: dict[str, Any]) -> np.ndarray:
    if "elements" in spec:
        elements = [base64.b64decode(e) for e in spec["elements"]]
        return np.array(elements, dtype=np.object_).reshape(spec["shape"])
    raw = base64.b64decode(spec["raw"])
    return np.frombuffer(raw, dtype=np.dtype(spec["dtype"])).reshape(spec["shape"])


def tensor_of(value: np.ndarray) -> dict[str, Any]:
    if value.dtype == np.object_:
        return {"shape": list(value.shape),
                "elements": [base64.b64encode(bytes(e)).decode() for e in value.reshape(-1)]}
    return {"dtype": value.dtype.str, "shape": list(value.shape),
            "raw": base64.b64encode(np.ascontiguousarray(value).tobytes()).decode()}


def drive(module: Any, client: Any, job: dict[str, Any], metadata: dict[str, Any]) -> dict[str, Any]:
    model = job["model"]
    inputs = []
    for spec in job["inputs"]:
        tensor = module.InferInput(spec["name"], list(spec["shape"]), spec["datatype"])
        tensor.set_data_from_numpy(array_of(spec))
        inputs.append(tensor)
    result = client.infer(model, inputs, parameters=job.get("parameters") or None)
    names = [o["name"] for o in metadata["outputs"]]
    return {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(model),
        "metadata": metadata,
        "outputs": {name: tensor_of(result.as_numpy(name)) for name in names},
    }


def main() -> int:
    with open(sys.argv[1]) as f:
        job = json.load(f)
    out = {}
    grpc_client = grpcclient.InferenceServerClient(job["grpc"])
    meta = grpc_client.get_model_metadata(job["model"], as_json=True)
    out["grpc"] = drive(grpcclient, grpc_client, job, meta)
    grpc_client.close()
    http_client = httpclient.InferenceServerClient(job["http"])
    meta = http_client.get_model_metadata(job["model"])
    out["http"] = drive(httpclient, http_client, job, meta)
    http_client.close()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
