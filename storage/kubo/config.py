"""The Kubo repo's config file: the loopback-only edits every repo fusenode creates gets.

Pure JSON edits; creating a repo needs the library, so it happens in a child process
(`fusenode.storage.kubo.child.ensure_repo`, started by `fusenode.storage.kubo.process.create_repo`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Final

from fusenode.storage.errors import BackendError, InvalidArgument
from fusenode.system import removed_on_error

NON_LOOPBACK_FILTERS: Final = (
    "/ip4/0.0.0.0/ipcidr/2",
    "/ip4/64.0.0.0/ipcidr/3",
    "/ip4/96.0.0.0/ipcidr/4",
    "/ip4/112.0.0.0/ipcidr/5",
    "/ip4/120.0.0.0/ipcidr/6",
    "/ip4/124.0.0.0/ipcidr/7",
    "/ip4/126.0.0.0/ipcidr/8",
    "/ip4/128.0.0.0/ipcidr/1",
    "/ip6/::/ipcidr/0",
)


def loopback_config(config: dict[str, Any], swarm_port: int) -> dict[str, Any]:
    """Edit a Kubo config dict in place so the node listens on and dials 127.0.0.1 only.

    The edits of design/libkubo.md (no bootstrap peers, swarm on 127.0.0.1:swarm_port, no
    API/gateway listeners, no mDNS, no UPnP/NAT-PMP, no relays, no AutoNAT service) plus one
    more, ``Swarm.AddrFilters`` denying every non-loopback address, so the node cannot dial an
    address it learns from a peer; and no per-block DHT providing (see below). Returns the
    dict for chaining.
    """
    check_port(swarm_port)
    config["Bootstrap"] = []
    addresses = config.setdefault("Addresses", {})
    addresses["Swarm"] = [f"/ip4/127.0.0.1/tcp/{swarm_port}"]
    addresses["API"] = []
    addresses["Gateway"] = []
    config.setdefault("Discovery", {}).setdefault("MDNS", {})["Enabled"] = False
    swarm = config.setdefault("Swarm", {})
    swarm["DisableNatPortMap"] = True
    swarm.setdefault("RelayClient", {})["Enabled"] = False
    swarm.setdefault("RelayService", {})["Enabled"] = False
    swarm["EnableHolePunching"] = False
    swarm["AddrFilters"] = list(NON_LOOPBACK_FILTERS)
    config.setdefault("AutoNAT", {})["ServiceMode"] = "disabled"
    # No DHT provider records for every 256 KiB block: fusenode finds holders by asking its
    # peers and bitswap asks connected peers directly, so announcing each block only costs
    # CPU (measured: add of 256 MiB 3.9-4.6 s -> 1.7-2.5 s, and ~1.5 CPU s less on peers).
    config.setdefault("Experimental", {})["StrategicProviding"] = True
    return config


def check_port(port: int) -> None:
    # Port 0 would let the kernel pick a new port at every start, so peers that remembered
    # our multiaddr could not redial us after a restart.
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise InvalidArgument(f"swarm port must be an integer in 1..65535, not {port!r}")


def configured_port(config: dict[str, Any]) -> int | None:
    for addr in config.get("Addresses", {}).get("Swarm") or []:
        parts = str(addr).split("/")
        if len(parts) >= 5 and parts[3] == "tcp" and parts[4].isdigit():
            return int(parts[4])
    return None


def read_config(config_path: Path) -> dict[str, Any]:
    with open(config_path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise BackendError(f"{config_path} is not a JSON object")
    return data


def write_config(config_path: Path, config: dict[str, Any]) -> None:
    """Replace the config atomically, keeping it private (it holds the node's private key)."""
    tmp = config_path.with_name(f".config.{os.getpid()}.tmp")
    with removed_on_error(tmp):
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, config_path)
