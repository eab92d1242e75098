"""The PredictionService servicer: protobuf in, numpy to the batcher, protobuf out.

`handle()` is the one place where errors become gRPC statuses (see meshserve/errors.py),
where metrics are counted and where the server span continues the caller's trace.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from meshserve import telemetry
from meshserve.errors import InvalidInput, MeshError, NotFound, NotReady, status_for
from meshserve.servers import tensors
from meshserve.servers.batching import Admission, Batcher
from meshserve.servers.metrics import ServerMetrics
from meshserve.servers.model import Model
from meshserve.v1 import prediction_pb2, prediction_pb2_grpc

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")
SERVICE_NAME = prediction_pb2.DESCRIPTOR.services_by_name["PredictionService"].full_name


class PredictionServicer(prediction_pb2_grpc.PredictionServiceServicer):
    """Serves one model. `ready` flips once the model is loaded and warm; `draining` on stop."""

    def __init__(
        self,
        model: Model,
        batcher: Batcher,
        admission: Admission,
        metrics: ServerMetrics,
        max_batch_size: int,
        tracing: bool,
    ):
        self.model = model
        self.batcher = batcher
        self.admission = admission
        self.metrics = metrics
        self.ready = False
        self.draining = False
        self._tracing = tracing
        self._tracer = trace.get_tracer("meshserve.servers")
        self._max_batch_size = max_batch_size
        self._metadata: prediction_pb2.ModelMetadata | None = None

    def mark_ready(self) -> None:
        """The model is loaded and warm: describe it (meta may depend on what load() found)."""
        self._metadata = self._build_metadata(self._max_batch_size)
        self.ready = True

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Like the generated add_PredictionServiceServicer_to_server, but Predict may reply
        with a tensors.Reply (large outputs serialised straight from their arrays)."""
        handlers = {
            "Predict": grpc.unary_unary_rpc_method_handler(
                self.Predict,
                request_deserializer=prediction_pb2.PredictRequest.FromString,
                response_serializer=tensors.serialize_reply,
            ),
            "GetModelMetadata": grpc.unary_unary_rpc_method_handler(
                self.GetModelMetadata,
                request_deserializer=prediction_pb2.GetModelMetadataRequest.FromString,
                response_serializer=prediction_pb2.ModelMetadata.SerializeToString,
            ),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
        server.add_registered_method_handlers(SERVICE_NAME, handlers)

    # -- the one error/metrics/tracing wrapper ---------------------------------------------

    async def handle(
        self,
        method: str,
        call: Callable[[Req, grpc.aio.ServicerContext], Awaitable[Resp]],
        request: Req,
        context: grpc.aio.ServicerContext,
    ) -> Resp:
        started = time.perf_counter()
        parent = telemetry.extract_context(context.invocation_metadata())
        span: Any = None
        if self._tracing:
            span = self._tracer.start_span(
                f"meshserve.v1.PredictionService/{method}",
                context=parent,
                kind=SpanKind.SERVER,
                attributes={"rpc.system": "grpc", "rpc.method": method, "model": self.model.name},
            )
            token = otel_context.attach(trace.set_span_in_context(span, parent))
        else:
            token = otel_context.attach(parent)
        try:
            response = await call(request, context)
        except asyncio.CancelledError:
            self.metrics.request_done(method, "CANCELLED", time.perf_counter() - started)
            if span is not None:
                span.set_status(Status(StatusCode.ERROR, "cancelled"))
            raise
        except Exception as exc:
            code = status_for(exc)
            message = str(exc) if isinstance(exc, MeshError) else "internal error"
            if not isinstance(exc, MeshError):
                trace_id = telemetry.trace_id_of()
                log.exception("%s failed (trace %s)", method, trace_id or "-")
                message = f"internal error (trace {trace_id or '-'})"
            elif log.isEnabledFor(logging.DEBUG):
                log.debug("%s → %s: %s", method, code.name, message)
            self.metrics.request_done(method, code.name, time.perf_counter() - started)
            if span is not None:
                span.set_attribute("rpc.grpc.status_code", code.value[0])
                span.set_status(Status(StatusCode.ERROR, message))
        else:
            self.metrics.request_done(method, "OK", time.perf_counter() - started)
            return response
        finally:
            if span is not None:
                span.end()
            otel_context.detach(token)
        await context.abort(code, message)
        raise AssertionError("unreachable: abort raises")

    # -- RPCs ------------------------------------------------------------------------------

    async def Predict(
        self, request: prediction_pb2.PredictRequest, context: grpc.aio.ServicerContext
    ) -> tensors.Reply | prediction_pb2.PredictResponse:
        return await self.handle("Predict", self._predict, request, context)

    async def GetModelMetadata(
        self, request: prediction_pb2.GetModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> prediction_pb2.ModelMetadata:
        return await self.handle("GetModelMetadata", self._get_metadata, request, context)

    async def _predict(
        self, request: prediction_pb2.PredictRequest, context: grpc.aio.ServicerContext
    ) -> tensors.Reply | prediction_pb2.PredictResponse:
        # Admission first: refusing must stay cheap, so nothing is decoded before it.
        self.admission.acquire()
        try:
            if not self.ready or self.draining:
                raise NotReady("model server is " + ("draining" if self.draining else "loading"))
            self._check_model(request.model_name, request.model_version)
            remaining = context.time_remaining()
            deadline = None if remaining is None else time.monotonic() + remaining
            signature = self.model.signature
            inputs = tensors.decode_inputs(request.inputs, signature)
            params = tensors.decode_params(request.parameters, signature)
            if self.model.check_off_loop:
                await asyncio.get_running_loop().run_in_executor(None, self.model.check, inputs, params)
            else:
                self.model.check(inputs, params)
            output_filter = request.output_filter
            wanted = set(output_filter) if output_filter else None
            if wanted:
                known = {spec.name for spec in signature.outputs}
                unknown = wanted - known
                if unknown:
                    raise InvalidInput(
                        f"output_filter: unknown outputs {sorted(unknown)}; known {sorted(known)}"
                    )
            outputs = await self.batcher.submit(inputs, params, deadline)
            if wanted:
                outputs = {name: value for name, value in outputs.items() if name in wanted}
            header = prediction_pb2.PredictResponse(
                model_name=self.model.name,
                model_version=self.model.version,
                request_id=request.request_id,
            )
            return tensors.reply(header, outputs)
        finally:
            self.admission.release()

    async def _get_metadata(
        self, request: prediction_pb2.GetModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> prediction_pb2.ModelMetadata:
        self._check_model(request.model_name, "")
        if self._metadata is None:
            raise NotReady("model server is loading")
        return self._metadata

    def _check_model(self, name: str, version: str) -> None:
        if name and name != self.model.name:
            raise NotFound(f"model_name: {name!r} is not served here (this is {self.model.name!r})")
        if version and version != self.model.version:
            raise NotFound(
                f"model_version: {name or self.model.name} version {version!r} is not served "
                f"here (this is {self.model.version!r})"
            )

    def _build_metadata(self, max_batch_size: int) -> prediction_pb2.ModelMetadata:
        sig = self.model.signature
        return prediction_pb2.ModelMetadata(
            name=self.model.name,
            version=self.model.version,
            role=self.model.role,
            inputs=[tensors.spec_message(s) for s in sig.inputs],
            outputs=[tensors.spec_message(s) for s in sig.outputs],
            meta=self.model.meta(),
            max_batch_size=max_batch_size,
            parameters=[tensors.param_spec_message(p) for p in sig.parameters],
        )
