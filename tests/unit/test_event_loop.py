"""Servers run on uvloop unless MESHSERVE_EVENT_LOOP=asyncio asks for asyncio's own loop."""

from __future__ import annotations

import asyncio

import pytest

from meshserve.rpc import event_loop


async def _loop_module() -> str:
    await asyncio.sleep(0)
    return type(asyncio.get_running_loop()).__module__


def test_servers_run_on_uvloop_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(event_loop.ENV, raising=False)
    assert event_loop.run(_loop_module()).startswith("uvloop")


def test_asyncio_loop_on_request(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(event_loop.ENV, "asyncio")
    assert event_loop.run(_loop_module()).startswith("asyncio")


def test_an_unknown_loop_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(event_loop.ENV, "trio")
    with pytest.raises(SystemExit, match="MESHSERVE_EVENT_LOOP must be uvloop or asyncio, not 'trio'"):
        event_loop.run(_loop_module())
