"""The PredictionService servicer: protobuf in, numpy to the batcher, protobuf out.

It raises from the error tree (meshserve/errors.py); the process's StatusInterceptor turns that into
gRPC statuses, counts the metrics and continues the caller's trace.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection

import grpc

from meshserve.errors import InvalidInput, MeshError, NotFound, NotReady
from meshserve.servers.batching import Admission, Batcher
from meshserve.servers.model import Model
from meshserve.v1 import prediction_pb2, prediction_pb2_grpc
from meshserve.wire import tensors
from meshserve.wire.signature import Arrays, ParamValue, Signature, rows

SERVICE_NAME = prediction_pb2.DESCRIPTOR.services_by_name["PredictionService"].full_name
# What a protocol's request decodes to: inputs, parameters, and the outputs wanted (None: all).
Decoded = tuple[Arrays, dict[str, ParamValue], Collection[str] | None]
Decode = Callable[[Signature], Decoded]
MAX_SHARDS_PER_CALL = 256  # names in PredictRequest.shards (a shard this process lacks is answered NOT_FOUND)


class PredictionServicer(prediction_pb2_grpc.PredictionServiceServicer):
    """Serves one model. `ready` flips once the model is loaded and warm; `draining` on stop."""

    def __init__(
        self,
        model: Model,
        batcher: Batcher,
        admission: Admission,
        max_batch_size: int,
        deadline_seen: Callable[[float], None] = lambda remaining_s: None,
    ):
        """`deadline_seen(seconds)` is told how much of its caller's deadline each call has left."""
        self.model = model
        self.batcher = batcher
        self.admission = admission
        self.ready = False
        self.draining = False
        self._max_batch_size = max_batch_size
        self._deadline_seen = deadline_seen
        self._metadata: prediction_pb2.ModelMetadata | None = None
        self._shard_versions: dict[str, str] = {}  # shard → its model version, for a model that serves shards
        self._serves_shards = False

    def mark_ready(self) -> None:
        """The model is loaded and warm: describe it (meta may depend on what load() found)."""
        self._metadata = self._build_metadata(self._max_batch_size)
        self._shard_versions = {shard: meta.get("version", "") for shard, meta in self.model.shard_meta().items()}
        self._serves_shards = bool(self._shard_versions)
        self.ready = True

    def release_shard(self, shard: str, reason: str) -> bool:
        """The model lets go of a retired shard (Model.release_shard); True if it did."""
        if not self.model.release_shard(shard, reason):
            return False
        self._shard_versions.pop(shard, None)
        self._metadata = self._build_metadata(self._max_batch_size)  # its meta names the shards served
        return True

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

    # -- RPCs (errors become statuses in meshserve.rpc.interceptor) ------------------------

    async def Predict(
        self, request: prediction_pb2.PredictRequest, context: grpc.aio.ServicerContext
    ) -> tensors.Reply | prediction_pb2.PredictResponse:
        if request.shards:
            return await self.search_shards(request, context.time_remaining())
        def decode(signature: Signature) -> Decoded:
            inputs = tensors.decode_inputs(request.inputs, signature)
            params = tensors.decode_params(request.parameters, signature)
            output_filter = request.output_filter
            wanted = set(output_filter) if output_filter else None
            if wanted:
                known = {spec.name for spec in signature.outputs}
                unknown = wanted - known
                if unknown:
                    raise InvalidInput(
                        f"output_filter: unknown outputs {sorted(unknown)}; known {sorted(known)}"
                    )
            return inputs, params, wanted

        outputs = await self.infer(request.model_name, request.model_version, decode, context.time_remaining())
        header = prediction_pb2.PredictResponse(
            model_name=self.model.name,
            model_version=self.model.version,
            request_id=request.request_id,
        )
        return tensors.reply(header, outputs)

    async def infer(self, name: str, version: str, decode: Decode, remaining: float | None) -> Arrays:
        """The one path of a call, whatever its protocol (Predict, OIP over gRPC or HTTP): admit,
        check readiness and the model asked for, decode against the signature, let the model
        refuse, batch within the caller's deadline (`remaining` seconds; None: no deadline),
        keep the outputs asked for."""
        # Admission first: refusing must stay cheap, so nothing is decoded before it.
        self.admission.acquire()
        try:
            if not self.ready or self.draining:
                raise NotReady("model server is " + ("draining" if self.draining else "loading"))
            self.check_model(name, version)
            deadline = None if remaining is None else time.monotonic() + remaining
            if remaining is not None:
                self._deadline_seen(remaining)
            inputs, params, wanted = decode(self.model.signature)
            if self.model.check_off_loop:  # the batcher runs it off the loop, with predict when it can
                outputs = await self.batcher.submit(inputs, params, deadline, check=self.model.check)
            else:
                self.model.check(inputs, params)
                outputs = await self.batcher.submit(inputs, params, deadline)
            if wanted:
                outputs = {name: value for name, value in outputs.items() if name in wanted}
            return outputs
        finally:
            self.admission.release()

    async def search_shards(self, request: prediction_pb2.PredictRequest,
                            remaining: float | None) -> prediction_pb2.PredictResponse:  # fmt: skip
        """A grouped indexer call: the inputs decoded once, each named shard searched with them, one
        ShardResult per shard carrying its outputs or its own status (a shard this process does
        not serve is NOT_FOUND, so the caller asks another replica for it)."""
        self.admission.acquire()
        try:
            if not self.ready or self.draining:
                raise NotReady("model server is " + ("draining" if self.draining else "loading"))
            self.check_model(request.model_name, "")
            if not self._serves_shards:
                raise InvalidInput(f"shards: {self.model.name} is a {self.model.role} model and serves no shards")
            shards = list(request.shards)
            if len(shards) > MAX_SHARDS_PER_CALL:
                raise InvalidInput(f"shards: {len(shards)} names exceed the limit of {MAX_SHARDS_PER_CALL}")
            if len(set(shards)) != len(shards):
                raise InvalidInput("shards: a shard is named twice")
            deadline = None if remaining is None else time.monotonic() + remaining
            if remaining is not None:
                self._deadline_seen(remaining)
            signature = self.model.signature
            inputs = tensors.decode_inputs(request.inputs, signature)
            params = tensors.decode_params(request.parameters, signature)
            size = rows(next(iter(inputs.values())))
            answers = await self.batcher.run_call(lambda: self._search_each(shards, inputs, params), size, deadline)
        finally:
            self.admission.release()
        reply = prediction_pb2.PredictResponse(model_name=self.model.name, model_version=self.model.version,
                                               request_id=request.request_id)  # fmt: skip
        for shard, outcome in zip(shards, answers, strict=True):
            result = reply.shard_results.add(shard=shard)
            if isinstance(outcome, MeshError):
                result.code, result.message = outcome.code.value[0], str(outcome)
                continue
            result.model_version = self._shard_versions.get(shard, "")
            for name, value in outcome.items():
                tensors.encode_tensor(value, result.outputs[name])
        return reply

    def _search_each(self, shards: list[str], inputs: Arrays,
                     params: dict[str, ParamValue]) -> list[Arrays | MeshError]:  # fmt: skip
        answers: list[Arrays | MeshError] = []
        for shard in shards:
            try:
                answers.append(self.model.search_shard(shard, inputs, params))
            except MeshError as exc:
                answers.append(exc)
        return answers

    async def GetModelMetadata(
        self, request: prediction_pb2.GetModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> prediction_pb2.ModelMetadata:
        self.check_model(request.model_name, "")
        if self._metadata is None:
            raise NotReady("model server is loading")
        return self._metadata

    def check_model(self, name: str, version: str) -> None:
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
