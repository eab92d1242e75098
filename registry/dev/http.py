"""HTTP details of the dev agent shared by its routes: Consul's query parameters and headers."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from aiohttp import web

from meshserve.registry.dev.filter import compile_filter
from meshserve.registry.dev.schema import KV_VALUE_MAX, BadRequest, parse_go_duration


def index_headers(resp: web.Response, index: int) -> None:
    resp.headers["X-Consul-Index"] = str(max(1, index))
    resp.headers["X-Consul-KnownLeader"] = "true"
    resp.headers["X-Consul-LastContact"] = "0"
    resp.headers["X-Consul-Effective-Consistency"] = "leader"


def dumps(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"))


def text_response(status: int, message: str) -> web.Response:
    return web.Response(status=status, text=message, content_type="text/plain")


def reject_constant(name: str) -> Any:
    raise ValueError(f"invalid character '{name[0]}' looking for beginning of value")


def too_large(size: int) -> str:
    return (f"Request body({size} bytes) too large, max size: {KV_VALUE_MAX} bytes. "
            "See https://developer.hashicorp.com/consul/docs/agent/config/config-files#kv_max_value_size.")


def blocking_params(request: web.Request) -> tuple[int, float | None]:
    index = 0
    if "index" in request.query:
        raw = request.query["index"]
        if not _is_uint64(raw):
            raise BadRequest("Invalid index")
        index = int(raw)
    wait: float | None = None
    if "wait" in request.query:
        try:
            wait = parse_go_duration(request.query["wait"])
        except ValueError:
            raise BadRequest("Invalid wait time") from None
    return index, wait


def parse_bool(raw: str) -> bool | None:
    return {"1": True, "t": True, "T": True, "true": True, "TRUE": True, "True": True,
            "0": False, "f": False, "F": False, "false": False, "FALSE": False,
            "False": False}.get(raw)


def bool_param(request: web.Request, name: str) -> bool:
    if name not in request.query:
        return False
    raw = request.query[name]
    if raw == "":
        return True
    value = parse_bool(raw)
    if value is None:
        raise BadRequest(f"Invalid value for ?{name}")
    return value


def required_bool(request: web.Request, name: str) -> bool:
    if name not in request.query:
        raise BadRequest(f"Missing value for {name}")
    value = parse_bool(request.query[name])
    if value is None:
        raise BadRequest(f"Invalid value for {name}: " + json.dumps(request.query[name]))
    return value


def uint_param(request: web.Request, name: str, message: str) -> int | None:
    if name not in request.query:
        return None
    raw = request.query[name]
    if not _is_uint64(raw):
        raise BadRequest(f"{message}: {raw!r}")
    return int(raw)


def filter_param(request: web.Request) -> Callable[[Any], bool]:
    expr = request.query.get("filter", "")
    if not expr:
        return lambda item: True
    return compile_filter(expr)


def keys_view(prefix: str, keys: list[str], separator: str) -> list[str]:
    if not separator:
        return keys
    out: list[str] = []
    for key in keys:
        cut = key.find(separator, len(prefix))
        shown = key if cut < 0 else key[: cut + len(separator)]
        if not out or out[-1] != shown:
            out.append(shown)
    return out


def _is_uint64(raw: str) -> bool:
    """Go's strconv.ParseUint(raw, 10, 64): ASCII digits only, below 2**64."""
    return raw.isascii() and raw.isdigit() and len(raw) <= 20 and int(raw) < 2**64
