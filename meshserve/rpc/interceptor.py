"""The one place where a handler's outcome becomes a gRPC status, a server span and a metric.

Every meshserve service method raises from the error tree in meshserve/errors.py; this interceptor
wraps each unary method of the services it is given: it continues the caller's W3C trace in a
server span, turns a MeshError into its status and message, turns anything else into INTERNAL
(logged with the trace id, the message naming only the trace), and reports
`(method, status name, seconds)` to the process's metrics. Other services (health, reflection)
pass through untouched.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from meshserve import telemetry
from meshserve.errors import MeshError, status_for

log = logging.getLogger(__name__)

# (short method name, status code name, seconds): e.g. ("Predict", "OK", 0.012)
Observe = Callable[[str, str, float], None]


class StatusInterceptor(grpc.aio.ServerInterceptor):
    """Wraps the unary methods of `services` (full names, e.g. meshserve.v1.PhotoSearch)."""

    def __init__(
        self,
        services: Collection[str],
        observe: Observe,
        span_attributes: Mapping[str, str] | None = None,
    ):
        self._services = frozenset(services)
        self._observe = observe
        self._span_attributes = dict(span_attributes or {})
        self._tracer = trace.get_tracer("meshserve.rpc")
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        if method in self._wrapped:  # handlers are fixed once the server starts
            return self._wrapped[method]
        handler = await continuation(handler_call_details)
        service, _, name = method.lstrip("/").rpartition("/")
        if service not in self._services or handler is None or handler.unary_unary is None:
            return handler
        wrapped = grpc.unary_unary_rpc_method_handler(
            self._guard(name, method.lstrip("/"), handler.unary_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
        self._wrapped[method] = wrapped
        return wrapped

    def _guard(
        self, name: str, span_name: str, behaviour: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
    ) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
        attributes = {"rpc.system": "grpc", "rpc.method": name, **self._span_attributes}

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            parent = telemetry.extract_context(context.invocation_metadata())
            span: Any = None
            if telemetry.exporting():
                span = self._tracer.start_span(span_name, context=parent, kind=SpanKind.SERVER,
                                               attributes=attributes)  # fmt: skip
                token = otel_context.attach(trace.set_span_in_context(span, parent))
            else:
                token = otel_context.attach(parent)
            try:
                response = await behaviour(request, context)
            except asyncio.CancelledError:  # the caller went away or its deadline passed
                self._observe(name, "CANCELLED", time.perf_counter() - started)
                if span is not None:
                    span.set_status(Status(StatusCode.ERROR, "cancelled"))
                raise
            except Exception as exc:
                code = status_for(exc)
                if isinstance(exc, MeshError):
                    message = str(exc)
                    if log.isEnabledFor(logging.DEBUG):
                        log.debug("%s → %s: %s", name, code.name, message)
                else:
                    trace_id = telemetry.trace_id_of()
                    log.exception("%s failed (trace %s)", name, trace_id or "-")
                    message = f"internal error (trace {trace_id or '-'})"
                self._observe(name, code.name, time.perf_counter() - started)
                if span is not None:
                    span.set_attribute("rpc.grpc.status_code", code.value[0])
                    span.set_status(Status(StatusCode.ERROR, message))
            else:
                self._observe(name, "OK", time.perf_counter() - started)
                return response
            finally:
                if span is not None:
                    span.end()
                otel_context.detach(token)
            await context.abort(code, message)
            raise AssertionError("unreachable: abort raises")

        return guarded
