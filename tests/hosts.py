"""Several "hosts" on one machine for tests: network namespaces joined by veth pairs on a bridge.

Each host is a network namespace with loopback up and one interface (`eth0`) whose other end is a
port of a bridge in the root namespace. The hosts share a /24 from 10.213.0.0/16 that no route of
the machine touches; the bridge holds its .254, so the test process can reach every host, and a host
reaches another only through the bridge. Cutting a host (`Host.cut()`, its bridge port set down)
therefore behaves like a pulled cable: packets vanish, connections hang, nothing is refused.

Names carry the creating pid (`meshserve-test-<pid>-<n>-<host>`, links `mst<pid><n>…`), so parallel
runs never collide, and `sweep_stale()` removes what a run whose pid is gone left behind (a run
killed before its finalizers ran). Processes on a host are started with `ip netns exec`, which
switches namespace and then execs the command in place: the pid and process group are the
command's own, so ManagedProcess stops them (and the reaper finds them) as usual.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.support import running

NS_PREFIX = "meshserve-test-"
LINK_PREFIX = "mst"
SUPERNET = ipaddress.ip_network("10.213.0.0/16")
_LOCK = Path(tempfile.gettempdir()) / "meshserve-test-hosts.lock"  # serialises subnet choice between parallel runs
_STALE_NS = re.compile(rf"^{NS_PREFIX}(\d+)-")
_STALE_LINK = re.compile(rf"^{LINK_PREFIX}(\d+)[a-z]")
_created = 0  # networks made by this process, for unique names


class HostsUnavailable(RuntimeError):
    """Namespaces cannot be made here (not root, no `ip`, no permission): the tests skip."""


def unavailable_reason() -> str | None:
    """Why network namespaces cannot be made here, or None when they can (probed, not assumed)."""
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    probe = f"{NS_PREFIX}{os.getpid()}-probe"
    try:
        _ip("netns", "add", probe)
    except HostsUnavailable as exc:
        return f"cannot create a network namespace: {exc}"
    _ip("netns", "del", probe, check=False)
    return None


def _ip(*args: str, check: bool = True) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise HostsUnavailable(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


@dataclass(frozen=True)
class Host:
    """One namespace: its name, its address, and the bridge port that is its cable."""

    name: str
    netns: str
    address: str
    link: str  # the root-namespace end of its veth pair (a bridge port)

    def argv(self, argv: Sequence[str]) -> list[str]:
        """`argv` run on this host."""
        return ["ip", "netns", "exec", self.netns, *argv]

    def cut(self) -> None:
        """Pull the cable: the host's packets go nowhere, its connections hang."""
        _ip("link", "set", self.link, "down")

    def mend(self) -> None:
        _ip("link", "set", self.link, "up")


@dataclass
class Hosts:
    """`with Hosts(["registry", "a", "b", "gateway"]) as hosts:` → hosts["a"].address …; every
    namespace, link and the bridge are removed on the way out, however the block ends."""

    names: Sequence[str]
    hosts: dict[str, Host] = field(default_factory=dict)
    bridge: str = ""
    subnet: ipaddress.IPv4Network | None = None

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    @property
    def gateway_address(self) -> str:
        """The test process's own address on the hosts' network (the bridge's)."""
        assert self.subnet is not None
        return str(self.subnet.network_address + 254)

    def __enter__(self) -> Hosts:
        global _created
        if len(self.names) > 9:
            raise ValueError("at most 9 hosts (interface names are limited to 15 characters)")
        sweep_stale()
        _created += 1
        tag = f"{os.getpid()}{chr(ord('a') + (_created - 1) % 26)}"
        self.bridge = f"{LINK_PREFIX}{tag}br"
        try:
            with open(_LOCK, "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                self.subnet = _free_subnet()
                _ip("link", "add", self.bridge, "type", "bridge")
                _ip("addr", "add", f"{self.gateway_address}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for i, name in enumerate(self.names):
                host = Host(name, f"{NS_PREFIX}{os.getpid()}-{_created}-{name}",
                            str(self.subnet.network_address + i + 1), f"{LINK_PREFIX}{tag}h{i}")  # fmt: skip
                self.hosts[name] = host
                _ip("netns", "add", host.netns)
                _ip("link", "add", host.link, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
                _ip("link", "set", host.link, "master", self.bridge, "up")
                _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
                _ip("-n", host.netns, "link", "set", "eth0", "up")
                _ip("-n", host.netns, "link", "set", "lo", "up")
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def destroy(self) -> list[str]:
        """Remove every namespace (its veth pair goes with it) and the bridge; returns what failed."""
        errors = []
        for host in self.hosts.values():
            for args in (("link", "del", host.link), ("netns", "del", host.netns)):
                if _exists(args[0], args[2]):
                    try:
                        _ip(*args)
                    except HostsUnavailable as exc:
                        errors.append(str(exc))
        if self.bridge and _exists("link", self.bridge):
            try:
                _ip("link", "del", self.bridge)
            except HostsUnavailable as exc:
                errors.append(str(exc))
        return errors


def _exists(kind: str, name: str) -> bool:
    if kind == "netns":
        return name in _namespaces()
    return subprocess.run(["ip", "link", "show", name], capture_output=True).returncode == 0


def _namespaces() -> list[str]:
    return [line.split()[0] for line in _ip("netns", "list", check=False).splitlines() if line.strip()]


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 of SUPERNET that no route or address of this machine overlaps (ours included)."""
    taken = []
    for route in json.loads(_ip("-j", "-4", "route", "show", "table", "all") or "[]"):
        dst = route.get("dst", "default")
        if dst != "default":
            taken.append(ipaddress.ip_network(dst, strict=False))
    subnets = list(SUPERNET.subnets(new_prefix=24))
    start = os.getpid() % len(subnets)
    for candidate in subnets[start:] + subnets[:start]:
        if not any(candidate.overlaps(t) for t in taken):
            return candidate
    raise HostsUnavailable(f"every /24 of {SUPERNET} is in use on this machine")


def sweep_stale() -> list[str]:
    """Remove namespaces and links of test runs whose pid is no longer running; returns their names."""
    removed = []
    for netns in _namespaces():
        match = _STALE_NS.match(netns)
        if match and not running(int(match.group(1))):
            _ip("netns", "del", netns, check=False)
            removed.append(netns)
    for line in _ip("-o", "link", "show", check=False).splitlines():
        name = line.split(":")[1].strip().split("@")[0] if line.count(":") >= 2 else ""
        match = _STALE_LINK.match(name)
        if match and not running(int(match.group(1))):
            _ip("link", "del", name, check=False)
            removed.append(name)
    return removed
