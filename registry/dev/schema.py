"""Decoding and validation of the dev agent's request bodies and query values, Consul's way."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

# Consul's limits (structs.ValidateServiceMetadata / ValidateMetadata).
META_MAX_PAIRS = 64
META_KEY_MAX = 128
META_VALUE_MAX = 512
META_KEY_RE = re.compile(r"^[a-zA-Z0-9_-]+$")
META_RESERVED_PREFIX = "consul-"
# Consul documents no length limit for names; these keep a dev agent's memory bounded.
NAME_MAX = 512
TAG_MAX = 512
TAGS_MAX = 256
KV_VALUE_MAX = 512 * 1024  # Consul's kv_max_value_size default

STATUSES = ("passing", "warning", "critical")


class BadRequest(Exception):
    """Bad input: the agent answers `status` with this message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def decode_failed(detail: str) -> BadRequest:
    return BadRequest(f"Request decode failed: {detail}")


# ---- durations -------------------------------------------------------------------------------

MAX_DURATION_S = (2**63 - 1) / 1e9  # Go's time.Duration range
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_RE = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_go_duration(text: str) -> float:
    """Seconds from a Go duration string ("10s", "1m30s", "250ms", "0"); ValueError if invalid."""
    s = text.strip()
    if not s:
        raise ValueError(f'time: invalid duration "{text}"')
    sign = 1.0
    if s[0] in "+-":
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if s == "0":
        return 0.0
    pos, total = 0, 0.0
    while pos < len(s):
        m = _DURATION_RE.match(s, pos)
        if not m:
            if re.fullmatch(r"[\d.]+", s[pos:]):
                raise ValueError(f'time: missing unit in duration "{text}"')
            raise ValueError(f'time: invalid duration "{text}"')
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if not math.isfinite(total) or total > MAX_DURATION_S:
        raise ValueError(f'time: invalid duration "{text}"')
    return sign * total


def duration_from_json(value: Any, path: str) -> float:
    """A JSON duration: a Go duration string or an integer number of nanoseconds."""
    if isinstance(value, bool):
        raise type_error(value, path, "time.Duration")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or abs(value) / 1e9 > MAX_DURATION_S:
            raise decode_failed(f"{path}: {value} ns is out of the range of a duration")
        return float(value) / 1e9
    if isinstance(value, str):
        try:
            return parse_go_duration(value)
        except ValueError as exc:
            raise decode_failed(f"{path}: {exc}") from None
    raise type_error(value, path, "time.Duration")


def format_go_duration(seconds: float) -> str:
    """Go's time.Duration.String(): 10s, 1m30s, 500ms, 1h0m0s, 0s."""
    ns = int(round(seconds * 1e9))
    if ns == 0:
        return "0s"
    sign = "-" if ns < 0 else ""
    ns = abs(ns)
    if ns < 1_000_000_000:
        for unit, size in (("ms", 1_000_000), ("µs", 1_000), ("ns", 1)):
            if ns >= size:
                return sign + _trim(ns / size) + unit
    hours, rem = divmod(ns, 3_600_000_000_000)
    minutes, rem = divmod(rem, 60_000_000_000)
    secs = _trim(rem / 1e9) + "s"
    if hours:
        return f"{sign}{hours}h{minutes}m{secs}"
    if minutes:
        return f"{sign}{minutes}m{secs}"
    return sign + secs


def _trim(value: float) -> str:
    text = f"{value:.9f}".rstrip("0").rstrip(".")
    return text or "0"


# ---- generic case-insensitive decoding ---------------------------------------------------------


def _norm(key: str) -> str:
    return key.replace("_", "").replace("-", "").lower()


def pick_fields(obj: Any, known: dict[str, tuple[str, ...]], path: str) -> dict[str, Any]:
    """Map an object's keys to canonical names (case-insensitive, snake_case accepted).

    `known` maps canonical name → extra aliases. Unknown keys fail the way Consul's decoder does.
    """
    if not isinstance(obj, dict):
        raise type_error(obj, path or "(body)", "struct")
    lookup: dict[str, str] = {}
    for canonical, aliases in known.items():
        lookup[_norm(canonical)] = canonical
        for alias in aliases:
            lookup[_norm(alias)] = canonical
    out: dict[str, Any] = {}
    unknown: list[str] = []
    for key, value in obj.items():
        found = lookup.get(_norm(str(key)))
        if found is None:
            unknown.append(str(key))
            continue
        canonical = found
        if canonical in out:
            raise decode_failed(f"'{path}' has duplicate keys for {canonical}")
        out[canonical] = value
    if unknown:
        # Consul decodes with Go's DisallowUnknownFields, which names the first one.
        raise decode_failed(f'json: unknown field "{unknown[0]}"')
    return out


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def type_error(value: Any, path: str, go_type: str) -> BadRequest:
    return decode_failed(
        f"json: cannot unmarshal {_json_type(value)} into Go struct field .{path} of type {go_type}"
    )


def as_str(value: Any, path: str, limit: int = NAME_MAX) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise type_error(value, path, "string")
    if len(value) > limit:
        raise BadRequest(f"{path} is {len(value)} characters long; the limit is {limit}")
    return value


def as_int(value: Any, path: str, lo: int = 0, hi: int = 2**31 - 1) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
        isinstance(value, float) and not (math.isfinite(value) and value.is_integer())
    ):
        raise type_error(value, path, "int")
    if not lo <= int(value) <= hi:
        raise BadRequest(f"{path} {int(value)} is out of range [{lo}, {hi}]")
    return int(value)


def as_bool(value: Any, path: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise type_error(value, path, "bool")
    return value


def as_str_list(value: Any, path: str, item_limit: int = TAG_MAX, max_items: int = TAGS_MAX) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise type_error(value, path, "[]string")
    if len(value) > max_items:
        raise BadRequest(f"{path} has {len(value)} items; the limit is {max_items}")
    return [as_str(v, f"{path}[{i}]", item_limit) for i, v in enumerate(value)]


def as_str_map(value: Any, path: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise type_error(value, path, "map[string]string")
    return {str(k): as_str(v, f"{path}[{k}]", 1 << 20) for k, v in value.items()}


def validate_meta(meta: dict[str, str], what: str = "Service Meta") -> None:
    """Consul's metadata rules; raises BadRequest with Consul's wording."""
    if len(meta) > META_MAX_PAIRS:
        raise BadRequest(
            f"Invalid {what}: Node metadata cannot contain more than {META_MAX_PAIRS} "
            "key/value pairs"
        )
    for key, value in meta.items():
        problem = ""
        if key == "":
            problem = "Key cannot be blank"
        elif not META_KEY_RE.match(key):
            problem = "Key contains invalid characters"
        elif len(key) > META_KEY_MAX:
            problem = f"Key is too long (limit: {META_KEY_MAX} characters)"
        elif key.startswith(META_RESERVED_PREFIX):
            problem = f"Key prefix '{META_RESERVED_PREFIX}' is reserved for internal use"
        elif len(value) > META_VALUE_MAX:
            problem = f"Value is too long (limit: {META_VALUE_MAX} characters)"
        if problem:
            raise BadRequest(
                f"Invalid {what}: Couldn't load metadata pair ('{_clip(key)}', '{_clip(value)}'): "
                f"{problem}"
            )


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---- service and check definitions -------------------------------------------------------------

CHECK_FIELDS: dict[str, tuple[str, ...]] = {
    "CheckID": ("ID",), "Name": (), "Status": (), "Notes": (), "ServiceID": (),
    "ScriptArgs": ("args",), "DockerContainerID": (), "Shell": (),
    "HTTP": (), "Header": (), "Method": (), "Body": (), "DisableRedirects": (),
    "TCP": (), "TCPUseTLS": (), "UDP": (), "OSService": (), "AliasNode": (), "AliasService": (),
    "GRPC": (), "GRPCUseTLS": (), "H2PING": (), "H2PingUseTLS": (),
    "TLSServerName": (), "TLSSkipVerify": (),
    "Interval": (), "Timeout": (), "TTL": (),
    "SuccessBeforePassing": (), "FailuresBeforeWarning": (), "FailuresBeforeCritical": (),
    "DeregisterCriticalServiceAfter": (), "OutputMaxSize": (), "Namespace": (), "Partition": (),
}

SERVICE_FIELDS: dict[str, tuple[str, ...]] = {
    "ID": (), "Name": ("Service",), "Tags": (), "Address": (), "TaggedAddresses": (),
    "Meta": (), "Port": (), "Kind": (), "Proxy": (), "Connect": (), "Check": (), "Checks": (),
    "EnableTagOverride": (), "Weights": (), "SocketPath": (), "Locality": (),
    "Namespace": (), "Partition": (), "Token": (),
}

UNSUPPORTED_KINDS = ("ScriptArgs", "DockerContainerID", "UDP", "OSService", "AliasNode",
                     "AliasService", "H2PING")


@dataclass(frozen=True)
class CheckDef:
    """One health check as registered (its runtime state lives in state.py)."""

    check_id: str
    name: str
    kind: str  # "ttl" | "http" | "grpc" | "tcp"
    service_id: str = ""
    notes: str = ""
    status: str = ""  # initial status; "" means critical
    interval: float = 0.0
    timeout: float = 0.0
    ttl: float = 0.0
    target: str = ""  # URL for http, host:port[/svc] for grpc, host:port for tcp
    method: str = "GET"
    header: dict[str, list[str]] = field(default_factory=dict)
    body: str = ""
    disable_redirects: bool = False
    use_tls: bool = False
    tls_skip_verify: bool = False
    tls_server_name: str = ""
    success_before_passing: int = 0
    failures_before_warning: int = 0
    failures_before_critical: int = 0
    deregister_after: float = 0.0  # 0 = never
    output_max_size: int = 4096

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CheckDef:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class ServiceDef:
    """One service instance as registered."""

    service_id: str
    name: str
    address: str = ""
    port: int = 0
    tags: tuple[str, ...] = ()
    meta: dict[str, str] = field(default_factory=dict)
    weights: dict[str, int] = field(default_factory=lambda: {"Passing": 1, "Warning": 1})
    enable_tag_override: bool = False
    tagged_addresses: dict[str, Any] = field(default_factory=dict)
    kind: str = ""
    socket_path: str = ""

    def to_json(self) -> dict[str, Any]:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__}
        data["tags"] = list(self.tags)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ServiceDef:
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        fields["tags"] = tuple(fields.get("tags", ()))
        return cls(**fields)


def parse_check(raw: Any, path: str, service_id: str = "", default_id: str = "",
                default_name: str = "") -> CheckDef:
    f = pick_fields(raw, CHECK_FIELDS, path)
    for unsupported in UNSUPPORTED_KINDS:
        if f.get(unsupported):
            raise BadRequest(
                f"Invalid check: {unsupported} checks are not supported by the meshserve dev agent "
                "(it runs TTL, HTTP, TCP and gRPC checks)"
            )
    name = as_str(f.get("Name"), f"{path}.Name") or default_name
    check_id = as_str(f.get("CheckID"), f"{path}.CheckID") or default_id or name
    name = name or check_id
    status = as_str(f.get("Status"), f"{path}.Status")
    if status and status not in STATUSES:
        raise BadRequest("Invalid check: Status for checks must 'passing', 'warning', 'critical'")
    durations = {}
    for key in ("Interval", "Timeout", "TTL", "DeregisterCriticalServiceAfter"):
        durations[key] = duration_from_json(f[key], f"{path}.{key}") if f.get(key) is not None else 0.0
        if durations[key] < 0:
            raise BadRequest(f"Invalid check: {key} must not be negative")
    kinds = [k for k in ("HTTP", "TCP", "GRPC") if f.get(k)]
    if durations["TTL"] > 0:
        kinds.append("TTL")
    if len(kinds) > 1:
        raise BadRequest(f"Invalid check: only one of HTTP, TCP, GRPC, TTL may be set, got {kinds}")
    if not kinds:
        raise BadRequest(
            "Invalid check: TTL must be > 0 for TTL checks, or one of HTTP, TCP, GRPC set "
            "with an Interval"
        )
    kind = kinds[0].lower()
    if kind != "ttl" and durations["Interval"] <= 0:
        raise BadRequest("Invalid check: Interval must be > 0 for Script, HTTP, H2PING, TCP or UDP checks")
    fbc = as_int(f.get("FailuresBeforeCritical"), f"{path}.FailuresBeforeCritical", 0, 10**6)
    fbw = as_int(f.get("FailuresBeforeWarning"), f"{path}.FailuresBeforeWarning", 0, 10**6)
    if fbw > fbc:
        raise BadRequest(
            "Invalid check: FailuresBeforeWarning can't be higher than FailuresBeforeCritical"
        )
    header_raw = f.get("Header") or {}
    if not isinstance(header_raw, dict):
        raise type_error(header_raw, f"{path}.Header", "map[string][]string")
    header = {str(k): as_str_list(v, f"{path}.Header[{k}]", 8192, 64) for k, v in header_raw.items()}
    target = as_str(f.get(kinds[0]) if kind != "ttl" else "", f"{path}.{kinds[0]}", 4096)
    if kind == "http" and not re.match(r"^https?://", target):
        raise BadRequest(f"Invalid check: HTTP must be an http:// or https:// URL, got {target!r}")
    if kind in ("tcp", "grpc") and ":" not in target.split("/", 1)[0]:
        raise BadRequest(f"Invalid check: {kinds[0]} must be host:port, got {target!r}")
    return CheckDef(
        check_id=check_id,
        name=name,
        kind=kind,
        service_id=as_str(f.get("ServiceID"), f"{path}.ServiceID") or service_id,
        notes=as_str(f.get("Notes"), f"{path}.Notes", 4096),
        status=status,
        interval=durations["Interval"],
        timeout=durations["Timeout"],
        ttl=durations["TTL"],
        target=target,
        method=as_str(f.get("Method"), f"{path}.Method", 16) or "GET",
        header=header,
        body=as_str(f.get("Body"), f"{path}.Body", 64 * 1024),
        disable_redirects=as_bool(f.get("DisableRedirects"), f"{path}.DisableRedirects"),
        use_tls=as_bool(f.get("GRPCUseTLS"), f"{path}.GRPCUseTLS")
        or as_bool(f.get("TCPUseTLS"), f"{path}.TCPUseTLS"),
        tls_skip_verify=as_bool(f.get("TLSSkipVerify"), f"{path}.TLSSkipVerify"),
        tls_server_name=as_str(f.get("TLSServerName"), f"{path}.TLSServerName"),
        success_before_passing=as_int(f.get("SuccessBeforePassing"),
                                      f"{path}.SuccessBeforePassing", 0, 10**6),
        failures_before_warning=fbw or fbc,
        failures_before_critical=fbc,
        deregister_after=durations["DeregisterCriticalServiceAfter"],
        output_max_size=as_int(f.get("OutputMaxSize"), f"{path}.OutputMaxSize", 0, 1 << 20) or 4096,
    )


def parse_service(raw: Any) -> tuple[ServiceDef, list[CheckDef]]:
    """A /v1/agent/service/register body → the service and its checks, with Consul's check IDs."""
    f = pick_fields(raw, SERVICE_FIELDS, "")
    name = as_str(f.get("Name"), "Name")
    if not name:
        raise BadRequest("Missing service name")
    service_id = as_str(f.get("ID"), "ID") or name
    meta = as_str_map(f.get("Meta"), "Meta")
    validate_meta(meta)
    weights = {"Passing": 1, "Warning": 1}
    if f.get("Weights") is not None:
        w = pick_fields(f["Weights"], {"Passing": (), "Warning": ()}, "Weights")
        weights = {"Passing": as_int(w.get("Passing"), "Weights.Passing", -(2**31), 2**31 - 1),
                   "Warning": as_int(w.get("Warning"), "Weights.Warning", -(2**31), 2**31 - 1)}
        if weights["Passing"] < 1:
            raise BadRequest("Invalid Weights: Passing must be greater than 0")
        if weights["Warning"] < 0:
            raise BadRequest("Invalid Weights: Warning must be greater or equal than 0")
        if weights["Passing"] > 65535 or weights["Warning"] > 65535:
            raise BadRequest("Invalid Weights: DNS Weight must be between 0 and 65535")
    tagged = f.get("TaggedAddresses") or {}
    if not isinstance(tagged, dict):
        raise type_error(tagged, "TaggedAddresses", "map[string]ServiceAddress")
    address = as_str(f.get("Address"), "Address", 1024)
    if address in ("0.0.0.0", "::", "[::]", "0:0:0:0:0:0:0:0"):
        raise BadRequest("Invalid service address")
    kind = as_str(f.get("Kind"), "Kind")
    if kind or f.get("Proxy") or f.get("Connect"):
        raise BadRequest("Connect proxies and gateways are not supported by the meshserve dev agent")
    service = ServiceDef(
        service_id=service_id,
        name=name,
        address=address,
        port=as_int(f.get("Port"), "Port", 0, 65535),
        tags=tuple(as_str_list(f.get("Tags"), "Tags")),
        meta=meta,
        weights=weights,
        enable_tag_override=as_bool(f.get("EnableTagOverride"), "EnableTagOverride"),
        tagged_addresses=tagged,
        socket_path=as_str(f.get("SocketPath"), "SocketPath", 1024),
    )
    raw_checks: list[tuple[str, Any]] = []
    if f.get("Check") is not None:
        raw_checks.append(("Check", f["Check"]))
    if f.get("Checks") is not None:
        if not isinstance(f["Checks"], list):
            raise type_error(f["Checks"], "Checks", "[]CheckType")
        raw_checks += [(f"Checks[{i}]", c) for i, c in enumerate(f["Checks"])]
    if len(raw_checks) > 64:
        raise BadRequest(f"A service may have at most 64 checks, got {len(raw_checks)}")
    checks = []
    for n, (path, raw_check) in enumerate(raw_checks, start=1):
        default_id = f"service:{service_id}" if len(raw_checks) == 1 else f"service:{service_id}:{n}"
        check = parse_check(raw_check, path, service_id, default_id, f"Service '{name}' check")
        if check.service_id != service_id:
            raise BadRequest(f"{path}.ServiceID must be {service_id!r} or empty")
        checks.append(check)
    if len({c.check_id for c in checks}) != len(checks):
        raise BadRequest("Duplicate check IDs in the service registration")
    return service, checks
