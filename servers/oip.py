"""inference.GRPCInferenceService (Open Inference Protocol v2) beside PredictionService on one model server.

A translation only: ModelInfer decodes with meshserve/wire/oip.py and runs through the
PredictionServicer's own `infer` (admission, readiness, model check, batcher, deadline), so an OIP
call and a Predict call of the same input give the same arrays. Errors come from the error tree
and become statuses in the process's StatusInterceptor, with the same metrics and spans.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

import meshserve
from meshserve.errors import NotFound
from meshserve.oip import grpc_predict_v2_pb2 as oip_pb2
from meshserve.servers.servicer import Decoded, PredictionServicer
from meshserve.wire import oip, tensors
from meshserve.wire.signature import Arrays, Signature

OIP_SERVICE_NAME = oip_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVER_NAME = "meshserve"
PLATFORM = "meshserve"


class OipServicer:
    """Answers OIP for the one model a PredictionServicer serves. RPCs not registered here
    (KServe's repository calls, Triton's extras) get UNIMPLEMENTED from grpc itself."""

    def __init__(self, prediction: PredictionServicer):
        self.prediction = prediction
        self.model = prediction.model

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Like a generated add_…_to_server, but ModelInfer may reply with a tensors.Reply (large
        outputs serialised straight from their arrays)."""
        handlers = {
            "ServerLive": _unary(self.ServerLive, oip_pb2.ServerLiveRequest),
            "ServerReady": _unary(self.ServerReady, oip_pb2.ServerReadyRequest),
            "ModelReady": _unary(self.ModelReady, oip_pb2.ModelReadyRequest),
            "ServerMetadata": _unary(self.ServerMetadata, oip_pb2.ServerMetadataRequest),
            "ModelMetadata": _unary(self.ModelMetadata, oip_pb2.ModelMetadataRequest),
            "ModelInfer": _unary(self.ModelInfer, oip_pb2.ModelInferRequest),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(OIP_SERVICE_NAME, handlers),))
        server.add_registered_method_handlers(OIP_SERVICE_NAME, handlers)

    # -- what both OIP forms (gRPC here, HTTP in servers/oip_http.py) ask --------------------

    @property
    def ready(self) -> bool:
        return self.prediction.ready and not self.prediction.draining

    def model_ready(self, name: str, version: str) -> bool:
        """Whether the named model is ready; NotFound when this server does not serve it."""
        if not name:
            raise NotFound("name: empty; ModelReady needs the model's name")
        self.prediction.check_model(name, version)
        return self.ready

    def model_metadata(self, name: str, version: str) -> oip_pb2.ModelMetadataResponse:
        if not name:
            raise NotFound("name: empty; ModelMetadata needs the model's name")
        self.prediction.check_model(name, version)
        return oip.model_metadata(self.model.name, self.model.version, PLATFORM, self.model.signature)

    async def run(self, request: oip_pb2.ModelInferRequest, remaining: float | None) -> Arrays:
        """The model's outputs for one ModelInferRequest, through the PredictionServicer's path."""

        def decode(signature: Signature) -> Decoded:
            inputs = oip.decode_inputs(request, signature)
            params = oip.decode_params(request.parameters, signature)
            return inputs, params, oip.requested_outputs(request, signature)

        return await self.prediction.infer(request.model_name, request.model_version, decode, remaining)

    # -- RPCs --------------------------------------------------------------------------------

    async def ServerLive(
        self, request: oip_pb2.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> oip_pb2.ServerLiveResponse:
        return oip_pb2.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: oip_pb2.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> oip_pb2.ServerReadyResponse:
        return oip_pb2.ServerReadyResponse(ready=self.ready)

    async def ModelReady(
        self, request: oip_pb2.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> oip_pb2.ModelReadyResponse:
        return oip_pb2.ModelReadyResponse(ready=self.model_ready(request.name, request.version))

    async def ServerMetadata(
        self, request: oip_pb2.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> oip_pb2.ServerMetadataResponse:
        return oip_pb2.ServerMetadataResponse(name=SERVER_NAME, version=meshserve.__version__, extensions=[])

    async def ModelMetadata(
        self, request: oip_pb2.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> oip_pb2.ModelMetadataResponse:
        return self.model_metadata(request.name, request.version)

    async def ModelInfer(
        self, request: oip_pb2.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> tensors.Reply | oip_pb2.ModelInferResponse:
        outputs = await self.run(request, context.time_remaining())
        header = oip_pb2.ModelInferResponse(
            model_name=self.model.name, model_version=self.model.version, id=request.id
        )
        return oip.reply(header, outputs)


def _unary(behaviour: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]], request: Any) -> grpc.RpcMethodHandler:
    return grpc.unary_unary_rpc_method_handler(
        behaviour, request_deserializer=request.FromString, response_serializer=tensors.serialize_reply
    )
