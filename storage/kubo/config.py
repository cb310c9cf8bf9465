"""The Kubo repo's config file: where the node listens and whom it may dial.

`network_config` applies a `SwarmSettings` to the config at every start of the node (and at
creation, before the repo is first used): Kubo's stock config dials public bootstrap peers,
uses mDNS and UPnP and listens everywhere, so fusenode overrides all of it.

- On a loopback host (the default, 127.0.0.1): listen on 127.0.0.1 only, and deny every
  non-loopback address in ``Swarm.AddrFilters``, so even an address learned from a peer cannot
  make the node dial out (design/libkubo.md; an strace showed no other traffic).
- On another host (an interface address, or 0.0.0.0 / :: for every interface): listen there;
  the only filters are the operator's ``deny`` ranges; loopback addresses are not announced
  to peers (``NoAnnounce``: a peer on another machine would dial its own loopback); the
  operator's ``announce`` multiaddrs replace the listen addresses for a node behind port
  forwarding.

Either way: no bootstrap peers (fusenode bootstraps to its own peers), no API or gateway
listener, no relays, no hole punching, no AutoNAT service, mDNS and UPnP only if the operator
turns them on, and no per-block DHT providing (fusenode finds holders by asking its peers).

Pure JSON edits; creating a repo needs the library, so it happens in a child process
(`fusenode.storage.kubo.child.ensure_repo`, started by `fusenode.storage.kubo.process.create_repo`).
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fusenode.storage.errors import BackendError
from fusenode.storage.multiformats import b58encode
from fusenode.storage.swarm import (
    LOOPBACK_RANGES,
    SwarmSettings,
    address,
    check_port,
    deny_filter,
)
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


def network_config(config: dict[str, Any], swarm: SwarmSettings, port: int) -> dict[str, Any]:
    """Edit a Kubo config dict in place for ``swarm`` listening on ``port``; see the module
    docstring. Returns the dict for chaining."""
    check_port(port)
    host = address(swarm.host)
    config["Bootstrap"] = []
    addresses = config.setdefault("Addresses", {})
    addresses["Swarm"] = [f"/ip{host.version}/{host}/tcp/{port}"]
    addresses["API"] = []
    addresses["Gateway"] = []
    addresses["Announce"] = list(swarm.announce)
    addresses["AppendAnnounce"] = []
    addresses["NoAnnounce"] = [] if swarm.loopback else list(LOOPBACK_RANGES)
    config.setdefault("Discovery", {}).setdefault("MDNS", {})["Enabled"] = swarm.mdns
    settings = config.setdefault("Swarm", {})
    settings["DisableNatPortMap"] = not swarm.nat_port_map
    settings.setdefault("RelayClient", {})["Enabled"] = False
    settings.setdefault("RelayService", {})["Enabled"] = False
    settings["EnableHolePunching"] = False
    filters = NON_LOOPBACK_FILTERS if swarm.loopback else ()
    settings["AddrFilters"] = [*filters, *(deny_filter(c) for c in swarm.deny)]
    config.setdefault("AutoNAT", {})["ServiceMode"] = "disabled"
    # No DHT provider records for every 256 KiB block: fusenode finds holders by asking its
    # peers and bitswap asks connected peers directly, so announcing each block only costs
    # CPU (measured: add of 256 MiB 3.9-4.6 s -> 1.7-2.5 s, and ~1.5 CPU s less on peers).
    config.setdefault("Experimental", {})["StrategicProviding"] = True
    return config


def loopback_config(config: dict[str, Any], swarm_port: int) -> dict[str, Any]:
    """`network_config` for the default: 127.0.0.1 only, every other address denied."""
    return network_config(config, SwarmSettings(), swarm_port)


def ed25519_identity() -> dict[str, str]:
    """A fresh libp2p Ed25519 identity for a Kubo config's ``Identity``: PeerID and PrivKey.

    Decision: every repo fusenode creates gets an Ed25519 identity (peer IDs ``12D3KooW...``,
    Kubo's own default since 0.13). The embedded library's CreateRepo makes a 2048-bit RSA key;
    its identity is replaced before the repo is first used. The node's peer key is what signs
    its peer protocol requests and the provenance of the models it optimizes, and an Ed25519
    peer ID carries its public key inline, so a verifier needs nothing but the ID. Repos made
    before keep their RSA key, which stays supported (`fusenode.node.peerkeys`).

    Encoding (libp2p crypto.proto): PrivateKey{Type = 1 (Ed25519), Data = seed || public key};
    the peer ID is the identity multihash (0x00, 36) of PublicKey{Type = 1, Data = public key},
    in base58btc.
    """
    key = Ed25519PrivateKey.generate()
    seed = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    private_proto = b"\x08\x01\x12\x40" + seed + public
    public_proto = b"\x08\x01\x12\x20" + public
    peer_id = b58encode(bytes([0x00, len(public_proto)]) + public_proto)
    return {"PeerID": peer_id, "PrivKey": base64.b64encode(private_proto).decode("ascii")}


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
