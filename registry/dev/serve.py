"""Running the dev agent as a process: state restore, checks, reaper, HTTP site, clean stop."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import ssl
import uuid
from collections.abc import Callable

from aiohttp import web

from meshserve.registry.dev import persist
from meshserve.registry.dev.acl import AclStore
from meshserve.registry.dev.agent import MAX_IN_FLIGHT, AgentConfig, DevAgent
from meshserve.registry.dev.checks import CheckClientTls, CheckRunner
from meshserve.registry.dev.state import DevState, NodeInfo

log = logging.getLogger(__name__)


def _raise_fd_limit() -> None:
    """Every parked blocking query holds a socket; the default soft limit (often 1024) is low."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = MAX_IN_FLIGHT + 1024 if hard == resource.RLIM_INFINITY else min(hard, MAX_IN_FLIGHT + 1024)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            log.warning("cannot raise the open-file limit above %s", soft)


def tls_context(config: AgentConfig) -> ssl.SSLContext | None:
    """The HTTPS listener's context (None without --https-addr); a bad setting exits with what to fix."""
    if config.https_addr is None:
        if config.verify_incoming:
            raise SystemExit("--verify-incoming is about HTTPS clients: give --https-addr too")
        if not config.http_enabled:
            raise SystemExit("--http-addr off leaves nothing to listen on: give --https-addr")
        return None
    if config.cert_file is None or config.key_file is None:
        raise SystemExit("HTTPS (--https-addr) needs --cert-file and --key-file")
    if config.verify_incoming and config.ca_file is None:
        raise SystemExit("--verify-incoming needs --ca-file: the CA that signs the clients' certificates")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(config.cert_file, config.key_file)
        if config.ca_file is not None:
            context.load_verify_locations(config.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise SystemExit(f"cannot load the agent's TLS files: {exc}") from None
    context.verify_mode = ssl.CERT_REQUIRED if config.verify_incoming else ssl.CERT_NONE
    return context


async def reload_certificate(config: AgentConfig, context: ssl.SSLContext, every_s: float = 30.0) -> None:
    """Load a renewed --cert-file/--key-file into the HTTPS listener's context: handshakes from then on present
    it, without a restart (a key that does not fit yet, mid-renewal, is tried again next time)."""
    cert, key = config.cert_file, config.key_file
    assert cert is not None and key is not None

    def stamp() -> tuple[int, ...]:
        try:
            return tuple(p.stat().st_mtime_ns for p in (cert, key))
        except OSError:
            return ()

    loaded = stamp()
    while True:
        await asyncio.sleep(every_s)
        now = stamp()
        if not now or now == loaded:
            continue
        try:
            context.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            log.warning("keeping the current HTTPS certificate: %s", exc)
            continue
        loaded = now
        log.info("reloaded HTTPS certificate %s", cert)


def _node_info(config: AgentConfig, node_id: str) -> NodeInfo:
    host = config.host if config.http_enabled or config.https_addr is None else config.https_addr[0]
    address = host if host not in ("", "0.0.0.0", "::") else "127.0.0.1"
    return NodeInfo(node_id=node_id, name=config.node_name or socket.gethostname(),
                    address=address, datacenter=config.datacenter)


async def serve(config: AgentConfig, ready: Callable[[int], None] | None = None) -> None:
    """Run the dev agent until SIGTERM/SIGINT; state is saved on the way out."""
    _raise_fd_limit()
    tls = tls_context(config)
    if config.data_dir is not None:
        persist.lock(config.data_dir)  # released when the process exits
    snapshot = persist.load(config.data_dir) if config.data_dir else None
    node_id = str(snapshot.get("node_id", "")) if snapshot else ""
    state = DevState(_node_info(config, node_id or str(uuid.uuid4())),
                     min_deregister_after=config.min_deregister_after)
    acl = AclStore(enabled=config.acl_enabled or config.acl_token is not None,
                   default_policy=config.acl_default_policy, initial_management=config.acl_token,
                   bump=state.bump_index)
    if snapshot:
        try:
            state.restore(snapshot)
            acl.restore(snapshot.get("acl", {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise SystemExit(f"the dev agent state in {config.data_dir} is damaged ({exc!r}); "
                             "move it away to start empty") from exc
    persister = None
    if config.data_dir is not None:
        persister = persist.Persister(config.data_dir, lambda: {**state.snapshot(), "acl": acl.snapshot()})
        state.on_change = persister.mark_dirty
        acl.on_change = persister.mark_dirty
        persister.start()
        persister.mark_dirty()  # record the index reservation before answering anything
        await persister.flush()
    check_tls = CheckClientTls.of(config.ca_file, config.cert_file, config.key_file)
    checks = CheckRunner(state, min_interval=config.min_check_interval, client_tls=check_tls)
    state.start_listeners()
    reaper = asyncio.get_running_loop().create_task(checks.reaper(config.reap_interval))
    reloader = asyncio.get_running_loop().create_task(reload_certificate(config, tls)) if tls else None
    agent = DevAgent(config, state, persister, acl)
    # handler_cancellation: a watcher that hangs up stops holding a parked blocking query.
    runner = web.AppRunner(agent.app(), access_log=None, handle_signals=False,
                           shutdown_timeout=0.2, handler_cancellation=True)
    await runner.setup()
    sites = [("http", config.host, config.port, None)] if config.http_enabled else []
    if config.https_addr is not None:
        sites.append(("https", *config.https_addr, tls))
    for scheme, host, wanted, context in sites:
        try:
            await web.TCPSite(runner, host, wanted, reuse_address=True, ssl_context=context).start()
        except OSError as exc:
            await runner.cleanup()
            await checks.close()
            raise SystemExit(f"cannot listen on {host}:{wanted} ({scheme}): {exc.strerror or exc}") from None
    port = runner.addresses[0][1] if runner.addresses else config.port
    listening = ", ".join(f"{scheme}://{host}:{address[1]}"
                          for (scheme, host, _, _), address in zip(sites, runner.addresses, strict=False))
    log.info("meshserve dev agent (Consul HTTP API subset) listening on %s%s", listening,
             f", state in {config.data_dir}" if config.data_dir else "")
    if ready is not None:
        ready(port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("dev agent stopping")
        reaper.cancel()
        if reloader is not None:
            reloader.cancel()
        await runner.cleanup()
        await checks.close()
        if persister is not None:
            await persister.close()
