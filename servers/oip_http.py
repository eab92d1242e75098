"""The REST form of Open Inference Protocol v2 on a model server's optional `--http-port` (aiohttp).

Same servicer, same path as the gRPC forms (servers/oip.py): one model, one batcher, one set of
limits. Each call is counted in the server's metrics (method `http:<Rpc>`) and traced in a
server span continuing the caller's `traceparent`. Errors are `{"error": "…"}` with 400 (bad
input), 404 (unknown model or version), 503 (loading, draining, overloaded), 504 (deadline).
With the server's TLS files it is HTTPS and wants a client certificate of the mesh CA, as its gRPC port does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

import meshserve
from meshserve import telemetry
from meshserve.errors import MeshError, status_for
from meshserve.rpc.https import ServerTls
from meshserve.rpc.tls_files import TlsFiles
from meshserve.servers.metrics import ServerMetrics
from meshserve.servers.oip import PLATFORM, SERVER_NAME, OipServicer
from meshserve.wire import oip_json

log = logging.getLogger(__name__)

_HTTP_STATUS = {
    "INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "NOT_FOUND": 404,
    "UNAVAILABLE": 503, "RESOURCE_EXHAUSTED": 503, "DEADLINE_EXCEEDED": 504,
}  # fmt: skip
Handler = Callable[[web.Request], Awaitable[web.Response]]
RELOAD_CHECK_S = 30.0  # certificates are renewed hours before they expire


class OipHttp:
    """An aiohttp site answering /v2/… for one OipServicer, on the model server's event loop."""

    def __init__(self, servicer: OipServicer, metrics: ServerMetrics, host: str, port: int, max_body_bytes: int,
                 tls: TlsFiles | None = None):  # fmt: skip
        self.servicer = servicer
        self.tls = ServerTls(tls) if tls is not None else None
        self._reloads: asyncio.Task[None] | None = None
        self.metrics = metrics
        self.host = host
        self.port = port
        self._tracer = trace.get_tracer("meshserve.servers.oip_http")
        self._app = web.Application(client_max_size=max_body_bytes)
        model = "/v2/models/{name}"
        version = "/v2/models/{name}/versions/{version}"
        self._app.add_routes([
            web.get("/v2/health/live", self._guard("ServerLive", self.live)),
            web.get("/v2/health/ready", self._guard("ServerReady", self.ready)),
            web.get("/v2", self._guard("ServerMetadata", self.server_metadata)),
            web.get(model, self._guard("ModelMetadata", self.model_metadata)),
            web.get(version, self._guard("ModelMetadata", self.model_metadata)),
            web.get(model + "/ready", self._guard("ModelReady", self.model_ready)),
            web.get(version + "/ready", self._guard("ModelReady", self.model_ready)),
            web.post(model + "/infer", self._guard("ModelInfer", self.infer)),
            web.post(version + "/infer", self._guard("ModelInfer", self.infer)),
        ])  # fmt: skip
        self._runner: web.AppRunner | None = None

    async def start(self) -> int:
        """Listen; return the bound port (also in self.port, when 0 asked for any)."""
        self._runner = web.AppRunner(self._app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_port=False,
                           ssl_context=self.tls.context if self.tls is not None else None)  # fmt: skip
        await site.start()
        if self.tls is not None:
            self._reloads = asyncio.create_task(self._reload_renewed(self.tls))
        server = site._server  # aiohttp exposes the bound sockets only here
        if server is not None and server.sockets:  # type: ignore[attr-defined]
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        log.info("OIP %s on %s:%d", "HTTPS" if self.tls else "HTTP", self.host, self.port)
        return self.port

    @staticmethod
    async def _reload_renewed(tls: ServerTls) -> None:
        while True:
            await asyncio.sleep(RELOAD_CHECK_S)
            tls.refresh()

    async def stop(self) -> None:
        if self._reloads is not None:
            self._reloads.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reloads
        if self._runner is not None:
            await self._runner.cleanup()

    # -- routes --------------------------------------------------------------------------------

    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        if not self.servicer.ready:
            return _error(503, "model server is " + ("draining" if self.servicer.prediction.draining else "loading"))
        return web.json_response({"ready": True})

    async def server_metadata(self, request: web.Request) -> web.Response:
        return web.json_response({"name": SERVER_NAME, "version": meshserve.__version__, "extensions": []})

    async def model_metadata(self, request: web.Request) -> web.Response:
        meta = self.servicer.model_metadata(request.match_info["name"], request.match_info.get("version", ""))
        return web.json_response({
            "name": meta.name, "versions": list(meta.versions), "platform": PLATFORM,
            "inputs": [_tensor(t) for t in meta.inputs], "outputs": [_tensor(t) for t in meta.outputs],
        })  # fmt: skip

    async def model_ready(self, request: web.Request) -> web.Response:
        if not self.servicer.model_ready(request.match_info["name"], request.match_info.get("version", "")):
            return _error(503, "model server is " + ("draining" if self.servicer.prediction.draining else "loading"))
        return web.json_response({"ready": True})

    async def infer(self, request: web.Request) -> web.Response:
        body = await request.read()
        message = oip_json.parse_request(
            body, request.headers.get(oip_json.HEADER_LENGTH),
            request.match_info["name"], request.match_info.get("version", ""),
        )  # fmt: skip
        outputs = await self.servicer.run(message, _timeout_s(message))
        model = self.servicer.model
        payload, json_length = oip_json.response_body(message, model.name, model.version, outputs)
        if json_length is None:
            return web.Response(body=payload, content_type="application/json")
        return web.Response(body=payload, content_type="application/octet-stream",
                            headers={oip_json.HEADER_LENGTH: str(json_length)})  # fmt: skip

    # -- one place for statuses, metrics and spans (the StatusInterceptor of this form) ----------

    def _guard(self, method: str, handler: Handler) -> Handler:
        name = f"http:{method}"
        attributes = {"rpc.system": "oip-http", "rpc.method": method, "model": self.servicer.model.name}

        async def guarded(request: web.Request) -> web.Response:
            started = time.perf_counter()
            parent = telemetry.extract_context([(k.lower(), v) for k, v in request.headers.items()])
            span: Any = None
            if telemetry.exporting():
                span = self._tracer.start_span(f"inference.GRPCInferenceService/{method}", context=parent,
                                               kind=SpanKind.SERVER, attributes=attributes)  # fmt: skip
                token = otel_context.attach(trace.set_span_in_context(span, parent))
            else:
                token = otel_context.attach(parent)
            try:
                response = await handler(request)
                code = "OK" if response.status < 400 else "UNAVAILABLE"
            except web.HTTPException as exc:  # aiohttp's own: body too large, bad method …
                code, response = "INVALID_ARGUMENT", _error(exc.status, exc.reason)
            except Exception as exc:
                grpc_code = status_for(exc)
                code = grpc_code.name
                if isinstance(exc, MeshError):
                    message = str(exc)
                else:
                    trace_id = telemetry.trace_id_of()
                    log.exception("%s failed (trace %s)", name, trace_id or "-")
                    message = f"internal error (trace {trace_id or '-'})"
                response = _error(_HTTP_STATUS.get(code, 500), message)
                if span is not None:
                    span.set_status(Status(StatusCode.ERROR, message))
            finally:
                if span is not None:
                    span.end()
                otel_context.detach(token)
            self.metrics.request_done(name, code, time.perf_counter() - started)
            return response

        return guarded


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _tensor(meta: Any) -> dict[str, Any]:
    return {"name": meta.name, "datatype": meta.datatype, "shape": list(meta.shape)}


def _timeout_s(message: Any) -> float | None:
    """Triton's `timeout` request parameter (microseconds) as the call's deadline; none without it."""
    if "timeout" not in message.parameters:
        return None
    value = message.parameters["timeout"]
    micros = getattr(value, value.WhichOneof("parameter_choice") or "int64_param")
    if type(micros) is not int or micros <= 0:
        return None
    return micros / 1e6

