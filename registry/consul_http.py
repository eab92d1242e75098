"""py-consul's asyncio client, opened from a RegistryConfig, and its errors translated once."""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import aiohttp
import consul
import consul.aio
import consul.base
import consul.exceptions

from meshserve.errors import FailedPrecondition, InvalidInput, NotReady
from meshserve.registry.config import RegistryConfig


class RegistryUnavailable(NotReady):
    """Consul did not answer (refused, reset, timed out, 5xx): try again later."""


class _HTTPClient(consul.aio.HTTPClient):
    """py-consul's aiohttp adapter with its session built the way aiohttp 3.10+ wants.

    py-consul 1.8 passes `verify_ssl`/`ssl_context` to aiohttp.TCPConnector, which aiohttp
    now reports with a DeprecationWarning on every client; the request path is kept as is.
    """

    def __init__(
        self,
        host: str,
        port: int,
        scheme: str,
        verify: bool | str = True,
        cert: Any = None,
        *,
        connect_timeout_s: float,
        tls_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        client_cert: tuple[str, str] | None = None,
    ) -> None:
        consul.base.HTTPClient.__init__(self, host, port, scheme, verify, cert)
        self.loop = None
        self._server_hostname = server_hostname
        self._client_cert = _RenewedCertificate(tls_context, *client_cert) if tls_context and client_cert else None
        tls: ssl.SSLContext | bool = False
        if tls_context is not None:
            tls = tls_context
        elif scheme == "https":
            if verify:
                context = ssl.create_default_context()
                if isinstance(verify, str):
                    context.load_verify_locations(verify)
            else:
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            if cert:
                if isinstance(cert, tuple):
                    context.load_cert_chain(*cert)
                else:
                    context.load_cert_chain(cert)
            tls = context
        # limit=0: watches hold one connection each for minutes; a pool cap would
        # silently queue every other request behind them.
        connector = aiohttp.TCPConnector(ssl=tls, limit=0)
        # No total timeout here: blocking queries legitimately take `wait` seconds, so
        # every caller bounds its own request with asyncio.wait_for.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s)
        self._session = aiohttp.ClientSession(connector=connector, timeout=timeout)

    async def _request(self, callback: Any, method: str, uri: str, headers: dict[str, str] | None,
                       data: Any = None, connections_timeout: Any = None, raw: bool = False) -> Any:
        if self._client_cert is not None:
            self._client_cert.refresh()
        if self._server_hostname is None:
            return await super()._request(callback, method, uri, headers, data, connections_timeout, raw)
        # CONSUL_TLS_SERVER_NAME: the agent's certificate names a host other than the address dialled.
        async with self._session.request(method, uri, headers=headers, data=data,
                                         server_hostname=self._server_hostname) as resp:
            body = await resp.read() if raw else await resp.text(encoding="utf-8")
            return callback(consul.base.Response(resp.status, resp.headers, body))


class _RenewedCertificate:
    """Our client certificate in `context`, loaded again when its files change: connections opened after a
    renewal present the new one (the agent refuses an expired certificate; open connections are unaffected)."""

    def __init__(self, context: ssl.SSLContext, cert: str, key: str):
        self.context, self.cert, self.key = context, cert, key
        self._stamp = self._now()

    def _now(self) -> tuple[int, ...]:
        try:
            return tuple(os.stat(path).st_mtime_ns for path in (self.cert, self.key))
        except OSError:
            return ()

    def refresh(self) -> None:
        now = self._now()
        if not now or now == self._stamp:
            return
        try:
            self.context.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError):  # a renewal half written: the next request tries again
            return
        self._stamp = now


class AsyncConsul(consul.aio.Consul):
    """consul.aio.Consul whose HTTP adapter is `_HTTPClient`."""

    def __init__(self, *args: Any, connect_timeout_s: float = 5.0, tls_context: ssl.SSLContext | None = None,
                 server_hostname: str | None = None, client_cert: tuple[str, str] | None = None,
                 **kwargs: Any) -> None:  # fmt: skip
        self._connect_timeout_s = connect_timeout_s
        self._tls_context = tls_context
        self._server_hostname = server_hostname
        self._client_cert = client_cert
        super().__init__(*args, **kwargs)

    def http_connect(
        self, host: str, port: int, scheme: Any, verify: bool | str = True, cert: Any = None
    ) -> _HTTPClient:
        return _HTTPClient(
            host, port, scheme, verify, cert, connect_timeout_s=self._connect_timeout_s,
            tls_context=self._tls_context, server_hostname=self._server_hostname, client_cert=self._client_cert,
        )


def open_consul(config: RegistryConfig) -> AsyncConsul:
    """A py-consul asyncio client for `config`; call inside a running event loop, close it."""
    client = AsyncConsul(
        host=config.host,
        port=config.port,
        scheme=config.scheme,
        token=config.token,
        connect_timeout_s=config.request_timeout_s,
        tls_context=config.ssl_context(),
        server_hostname=config.server_hostname(),
        client_cert=(config.cert_file, config.key_file) if config.cert_file and config.key_file else None,
    )
    # py-consul lets CONSUL_HTTP_TOKEN override an explicit token; the config already
    # resolved flags against the environment, so it is the one that counts.
    client.token = config.token
    return client


@contextmanager
def translate_errors(action: str, config: RegistryConfig) -> Iterator[None]:
    """Turn transport and Consul errors into the meshserve error tree, with what was tried."""
    where = config.http_addr
    try:
        yield
    except (consul.ACLPermissionDenied, consul.ACLDisabled) as exc:
        raise FailedPrecondition(
            f"{action}: Consul at {where} refused the request ({exc}); "
            "set CONSUL_HTTP_TOKEN to a token allowed to do this"
        ) from exc
    except (consul.exceptions.BadRequest, consul.exceptions.ClientError) as exc:
        raise InvalidInput(f"{action}: Consul at {where} rejected it: {exc}") from exc
    except consul.ConsulException as exc:  # 5xx, undecodable answers, missing index
        raise RegistryUnavailable(f"{action}: Consul at {where} failed: {exc}") from exc
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        raise RegistryUnavailable(
            f"{action}: Consul at {where} is unreachable ({type(exc).__name__}: {exc})"
        ) from exc
