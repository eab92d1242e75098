"""The dev agent's health checks: gRPC, HTTP, TCP probes on their intervals, TTL timers, the reaper."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshserve.registry.dev.schema import CheckDef
from meshserve.registry.dev.state import CheckState, DevState

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 10.0  # Consul's default for HTTP, TCP and gRPC checks
MAX_TIMEOUT_S = 3600.0  # longer timeouts are accepted but a probe never waits longer
CONSUL_MIN_INTERVAL_S = 1.0  # Consul raises shorter intervals to this (checks.MinInterval)
_GRPC_OPTIONS: list[tuple[str, str | int]] = [
    # A target that went away must be seen again soon after it returns, so reconnect quickly.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_receive_message_length", 64 * 1024),
    ("grpc.enable_retries", 0),
]


@dataclass(frozen=True)
class _ChannelKey:
    hostport: str
    use_tls: bool
    skip_verify: bool
    server_name: str


def _channel_key(d: CheckDef) -> _ChannelKey:
    return _ChannelKey(d.target.partition("/")[0], d.use_tls, d.tls_skip_verify, d.tls_server_name)


@dataclass(frozen=True)
class CheckClientTls:
    """The agent's own TLS material (ca_file, cert_file, key_file) for TLS gRPC checks: the CA verifies the
    target, the certificate answers a target that requires client certificates (mutual TLS)."""

    ca_file: Path | None
    cert_file: Path | None
    key_file: Path | None

    @classmethod
    def of(cls, ca_file: Path | None, cert_file: Path | None, key_file: Path | None) -> CheckClientTls | None:
        if (cert_file is None) != (key_file is None):
            raise SystemExit("--cert-file and --key-file go together")
        return None if ca_file is None and cert_file is None else cls(ca_file, cert_file, key_file)

    def stamp(self) -> tuple[int, ...]:
        files = [f for f in (self.ca_file, self.cert_file, self.key_file) if f is not None]
        try:
            return tuple(f.stat().st_mtime_ns for f in files)
        except OSError:
            return ()

    def read(self) -> tuple[bytes | None, bytes | None, bytes | None]:
        """(CA, key, certificate) PEM bytes; a key caught mid-renewal is re-read until it fits."""
        ca = self.ca_file.read_bytes() if self.ca_file else None
        for _ in range(20):
            cert = self.cert_file.read_bytes() if self.cert_file else None
            key = self.key_file.read_bytes() if self.key_file else None
            if cert is None or key is None or _key_fits(cert, key):
                return ca, key, cert
            time.sleep(0.01)
        return ca, key, cert


def _key_fits(cert_pem: bytes, key_pem: bytes) -> bool:
    from meshserve.pki.inspect import key_matches

    return key_matches(cert_pem, key_pem)


class GrpcChannelPool:
    """One channel per target: a check costs one small RPC, not a new connection."""

    def __init__(self, client_tls: CheckClientTls | None = None) -> None:
        self._channels: dict[_ChannelKey, grpc.aio.Channel] = {}
        self._tls = client_tls
        self._tls_stamp = client_tls.stamp() if client_tls else ()

    async def get(self, key: _ChannelKey, timeout: float) -> grpc.aio.Channel:
        if key.use_tls and self._tls is not None and self._tls.stamp() != self._tls_stamp:
            # renewed certificate: TLS channels reconnect presenting it (a kept channel would not)
            self._tls_stamp = self._tls.stamp()
            for old in [k for k in self._channels if k.use_tls]:
                await self.drop(old)
        channel = self._channels.get(key)
        if channel is None:
            channel = await self._open(key, timeout)
            self._channels[key] = channel
        return channel

    async def _open(self, key: _ChannelKey, timeout: float) -> grpc.aio.Channel:
        if not key.use_tls:
            return grpc.aio.insecure_channel(key.hostport, options=_GRPC_OPTIONS)
        options: list[tuple[str, str | int]] = list(_GRPC_OPTIONS)
        roots, client_key, client_cert = self._tls.read() if self._tls else (None, None, None)
        server_name = key.server_name
        if key.skip_verify:
            # gRPC cannot turn verification off; trusting the certificate the server presents
            # right now is the equivalent for the self-signed certificates this is used with.
            roots, cert_name = await _fetch_server_cert(key.hostport, timeout)
            server_name = server_name or cert_name
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        creds = grpc.ssl_channel_credentials(roots, client_key, client_cert)
        return grpc.aio.secure_channel(key.hostport, creds, options=options)

    def keys(self) -> set[_ChannelKey]:
        return set(self._channels)

    async def drop(self, key: _ChannelKey) -> None:
        channel = self._channels.pop(key, None)
        if channel is not None:
            await channel.close()

    async def close(self) -> None:
        for key in list(self._channels):
            await self.drop(key)


async def _fetch_server_cert(hostport: str, timeout: float) -> tuple[bytes, str]:
    host, _, port = hostport.rpartition(":")
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    _, writer = await asyncio.wait_for(
        asyncio.open_connection(host.strip("[]"), int(port), ssl=ctx), timeout
    )
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.transport.abort()  # no TLS close_notify dance: peers may never answer it
    name = ""
    try:
        from cryptography import x509

        cert = x509.load_der_x509_certificate(der)
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            names = san.value.get_values_for_type(x509.DNSName)
            name = names[0] if names else ""
        except x509.ExtensionNotFound:
            pass
        if not name:
            cns = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
            name = str(cns[0].value) if cns else ""
    except ImportError:
        name = host
    return ssl.DER_cert_to_PEM_cert(der).encode(), name


class CheckRunner:
    """Runs every registered check; listens to DevState for checks coming and going."""

    def __init__(self, state: DevState, min_interval: float = CONSUL_MIN_INTERVAL_S,
                 max_concurrency: int = 64, client_tls: CheckClientTls | None = None):
        self.state = state
        self.min_interval = min_interval
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._tasks_defs: dict[str, CheckDef] = {}
        self._ttl_timers: dict[str, asyncio.TimerHandle] = {}
        self._limit = asyncio.Semaphore(max_concurrency)
        self._grpc = GrpcChannelPool(client_tls)
        self._http: aiohttp.ClientSession | None = None
        state.listeners.append(self)

    # ---- CheckListener -------------------------------------------------------------------------

    def check_added(self, check: CheckState) -> None:
        self.check_removed(check.check_id)
        d = check.definition
        if d.kind == "ttl":
            loop = asyncio.get_running_loop()
            self._ttl_timers[d.check_id] = loop.call_later(d.ttl, self._ttl_expired, d.check_id)
        elif d.kind in ("http", "grpc", "tcp"):
            self._tasks[d.check_id] = asyncio.get_running_loop().create_task(
                self._run(d), name=f"check {d.check_id}"
            )
            self._tasks_defs[d.check_id] = d

    def check_removed(self, check_id: str) -> None:
        task = self._tasks.pop(check_id, None)
        if task is not None:
            task.cancel()
            self._tasks_defs.pop(check_id, None)
            # Close the target's channel unless another check still uses it (decided a moment
            # later, so that a check re-registered at once keeps its channel).
            asyncio.get_running_loop().call_soon(self._close_unused_channels)
        timer = self._ttl_timers.pop(check_id, None)
        if timer is not None:
            timer.cancel()

    def _close_unused_channels(self) -> None:
        used = {_channel_key(d) for d in self._tasks_defs.values() if d.kind == "grpc"}
        for key in self._grpc.keys() - used:
            asyncio.get_running_loop().create_task(self._grpc.drop(key))

    # ---- running -------------------------------------------------------------------------------

    def _ttl_expired(self, check_id: str) -> None:
        self._ttl_timers.pop(check_id, None)
        self.state.set_check_status(check_id, "critical", "TTL expired")

    async def _run(self, d: CheckDef) -> None:
        interval = max(d.interval, self.min_interval)
        timeout = min(d.timeout or DEFAULT_TIMEOUT_S, MAX_TIMEOUT_S)
        while True:
            async with self._limit:
                try:
                    # The probes honour `timeout` themselves; this is the backstop that keeps
                    # one wedged probe from freezing the check's status forever.
                    status, output = await asyncio.wait_for(self.probe(d, timeout), timeout + 1.0)
                except TimeoutError:
                    status, output = "critical", f"check timed out after {timeout:.3g}s"
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # a probe bug must not stop the check
                    log.exception("check %s failed unexpectedly", d.check_id)
                    status, output = "critical", f"check error: {exc!r}"
            current = self.state.checks.get(d.check_id)
            if current is None or current.definition is not d:
                return
            self.state.record_result(d.check_id, status, output)
            await asyncio.sleep(interval)

    async def probe(self, d: CheckDef, timeout: float) -> tuple[str, str]:
        if d.kind == "grpc":
            return await self._probe_grpc(d, timeout)
        if d.kind == "http":
            return await self._probe_http(d, timeout)
        return await self._probe_tcp(d, timeout)

    async def _probe_grpc(self, d: CheckDef, timeout: float) -> tuple[str, str]:
        service = d.target.partition("/")[2]
        key = _channel_key(d)
        try:
            channel = await self._grpc.get(key, timeout)
            stub = health_pb2_grpc.HealthStub(channel)
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            # The channel stays: it reconnects on its own within its (short) backoff when the
            # target returns, and a probe through it costs a quarter of a new channel.
            return "critical", f"gRPC check {d.target}: failed: {exc.code().name}: {exc.details()}"
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            await self._grpc.drop(key)
            return "critical", f"gRPC check {d.target}: failed: {exc!r}"
        if reply.status == health_pb2.HealthCheckResponse.SERVING:
            return "passing", f"gRPC check {d.target}: success"
        status_name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        return "critical", f"gRPC check {d.target}: failed: service reports {status_name}"

    async def _probe_http(self, d: CheckDef, timeout: float) -> tuple[str, str]:
        if self._http is None:
            self._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))
        headers = {"User-Agent": "Consul Health Check", "Accept": "text/plain, text/*, */*"}
        for name, values in d.header.items():
            if values:
                headers[name] = ",".join(values)
        try:
            async with self._http.request(
                d.method, d.target, headers=headers, data=d.body or None,
                allow_redirects=not d.disable_redirects, max_redirects=10,
                ssl=False if d.tls_skip_verify else True,
                server_hostname=d.tls_server_name or None,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as resp:
                body = await resp.content.read(d.output_max_size)
                code, reason = resp.status, resp.reason or ""
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            return "critical", f'{d.method} "{d.target}": {exc!r}'
        output = (f"HTTP {d.method} {d.target}: {code} {reason} Output: "
                  f"{body.decode('utf-8', 'replace')}")
        if 200 <= code < 300:
            return "passing", output
        if code == 429:
            return "warning", output
        return "critical", output

    async def _probe_tcp(self, d: CheckDef, timeout: float) -> tuple[str, str]:
        host, _, port = d.target.rpartition(":")
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(host.strip("[]"), int(port)), timeout
            )
        except (OSError, TimeoutError, ValueError) as exc:
            return "critical", f"dial tcp {d.target}: {exc!r}"
        writer.transport.abort()
        return "passing", f"TCP connect {d.target}: Success"

    async def reaper(self, every: float) -> None:
        """Consul's reaper: every `every` seconds, remove services critical for too long."""
        while True:
            await asyncio.sleep(every)
            try:
                self.state.reap()
            except Exception:
                log.exception("reaper failed")

    async def close(self) -> None:
        for check_id in list(self._tasks) + list(self._ttl_timers):
            self.check_removed(check_id)
        await self._grpc.close()
        if self._http is not None:
            await self._http.close()
