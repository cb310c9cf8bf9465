"""Hosts made of Linux network namespaces: nodes "on different machines" on one machine.

For the tests and the benchmark of nodes on several hosts (`fusenode.node.localnet` runs one
daemon per host). Layout, all of it inside namespaces this object creates, nothing added to the
machine's own network::

    <prefix>-br      a namespace holding the bridge br0 (the "switch")
    <prefix>-h<i>    one namespace per host: lo, and eth0 with SUBNET.<i+1>/24, whose veth
                     peer h<i> sits in <prefix>-br, attached to br0

One private /24 (:data:`SUBNET`), used only inside these namespaces. `cut` takes a host's link
down on the switch side: its packets are dropped silently, as with a pulled cable (peers see
silence, not refusals); `restore` brings it back. `destroy` (also on leaving the ``with``
block, even after a failure) deletes every namespace, which deletes the links with them.

Needs root (CAP_NET_ADMIN) and iproute2's ``ip``: `unavailable` says why not.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Final

__all__ = ["SUBNET", "NamespaceHosts", "unavailable"]

#: The private /24 the hosts live in (10.99.77.1, .2, ...).
SUBNET: Final = "10.99.77"


def unavailable() -> str | None:
    """Why namespace hosts cannot be made here, or None when they can."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"fusenode-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


class NamespaceHosts:
    """``count`` hosts on one switch; see the module docstring."""

    def __init__(self, count: int, prefix: str | None = None) -> None:
        if not 1 <= count <= 200:
            raise ValueError("between 1 and 200 hosts")
        self.count = count
        self.prefix = prefix or f"fn{os.getpid()}"
        self.bridge = f"{self.prefix}-br"
        self.names = [f"{self.prefix}-h{i}" for i in range(count)]
        self._made: list[str] = []

    def address(self, i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    def exec_prefix(self, i: int) -> list[str]:
        """The command prefix that runs a program on host ``i``."""
        return ["ip", "netns", "exec", self.names[i]]

    def create(self) -> NamespaceHosts:
        try:
            self._add(self.bridge)
            _ip("-n", self.bridge, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.bridge, "link", "set", "br0", "up")
            for i, name in enumerate(self.names):
                self._add(name)
                _ip("link", "add", "eth0", "netns", name, "type", "veth", "peer", "name",
                    f"h{i}", "netns", self.bridge)  # fmt: skip
                _ip("-n", self.bridge, "link", "set", f"h{i}", "master", "br0")
                _ip("-n", self.bridge, "link", "set", f"h{i}", "up")
                _ip("-n", name, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
                _ip("-n", name, "link", "set", "eth0", "up")
        except BaseException:
            self.destroy()
            raise
        return self

    def _add(self, name: str) -> None:
        _ip("netns", "add", name)
        self._made.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def readdress(self, i: int, address: str) -> None:
        """Give host ``i`` another address in the subnet (a machine whose address changed)."""
        _ip("-n", self.names[i], "addr", "flush", "dev", "eth0")
        _ip("-n", self.names[i], "addr", "add", f"{address}/24", "dev", "eth0")

    def cut(self, i: int) -> None:
        """Take host ``i``'s link down: its packets vanish, nobody is told."""
        _ip("-n", self.bridge, "link", "set", f"h{i}", "down")

    def restore(self, i: int) -> None:
        _ip("-n", self.bridge, "link", "set", f"h{i}", "up")

    def destroy(self) -> None:
        for name in reversed(self._made):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        self._made.clear()

    def __enter__(self) -> NamespaceHosts:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.destroy()
