"""StatusInterceptor on a real grpc.aio server: statuses, messages and metrics for the services it
is given, and nothing for the others."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from meshserve.errors import InvalidInput, NotReady
from meshserve.rpc.interceptor import StatusInterceptor

WRAPPED, OTHER = "test.v1.Wrapped", "test.v1.Other"


async def answer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    if request == b"bad":
        raise InvalidInput("inputs['x']: bad bytes")
    if request == b"loading":
        raise NotReady("model server is loading")
    if request == b"bug":
        raise RuntimeError("secret internals")
    return request.upper()


def handlers(service: str) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(service, {"Call": grpc.unary_unary_rpc_method_handler(answer)})


@pytest.fixture
async def served() -> AsyncIterator[tuple[grpc.aio.Channel, list[tuple[str, str]]]]:
    observed: list[tuple[str, str]] = []
    interceptor = StatusInterceptor([WRAPPED], lambda method, code, seconds: observed.append((method, code)))
    server = grpc.aio.server(interceptors=[interceptor])
    server.add_generic_rpc_handlers((handlers(WRAPPED), handlers(OTHER)))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel, observed
    finally:
        await server.stop(None)


async def call(channel: grpc.aio.Channel, service: str, body: bytes) -> bytes:
    return await channel.unary_unary(f"/{service}/Call")(body, timeout=10)


async def test_errors_become_their_status_and_every_call_is_observed(served) -> None:  # type: ignore[no-untyped-def]
    channel, observed = served
    assert await call(channel, WRAPPED, b"ok") == b"OK"
    expected = [(b"bad", grpc.StatusCode.INVALID_ARGUMENT, "inputs['x']: bad bytes"),
                (b"loading", grpc.StatusCode.UNAVAILABLE, "model server is loading"),
                (b"bug", grpc.StatusCode.INTERNAL, "internal error (trace ")]  # fmt: skip
    for body, code, message in expected:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(channel, WRAPPED, body)
        assert info.value.code() == code
        assert (info.value.details() or "").startswith(message)
        assert "secret" not in (info.value.details() or "")
    assert observed == [("Call", "OK"), ("Call", "INVALID_ARGUMENT"), ("Call", "UNAVAILABLE"), ("Call", "INTERNAL")]


async def test_services_it_was_not_given_pass_through_untouched(served) -> None:  # type: ignore[no-untyped-def]
    channel, observed = served
    assert await call(channel, OTHER, b"ok") == b"OK"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(channel, OTHER, b"bad")
    assert info.value.code() == grpc.StatusCode.UNKNOWN  # grpc's own answer to an exception, not ours
    assert observed == []
