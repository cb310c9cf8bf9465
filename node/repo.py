"""A node's repo: one folder holding everything the node owns (its files: `fusenode.layout`).

Default location ~/.fusenode, or FUSENODE_REPO, or --repo.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from fusenode.layout import RepoLayout
from fusenode.node.config import Config, load_config, render_config, swarm_settings
from fusenode.node.errors import RepoError
from fusenode.storage import age
from fusenode.storage.backend import NodeIdentity
from fusenode.storage.errors import InvalidArgument
from fusenode.storage.swarm import SwarmSettings
from fusenode.system import free_loopback_port, free_tcp_port

if TYPE_CHECKING:
    from fusenode.storage.kubo import KuboNode


def default_repo_path(cli_value: str | None = None) -> Path:
    if cli_value:
        return Path(cli_value).expanduser()
    env = os.environ.get("FUSENODE_REPO")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".fusenode"


def write_private(path: Path, text: str) -> None:
    """Create ``path`` with mode 0600 (never readable by others, not even briefly)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def identity_text(identity: age.KeyIdentity) -> str:
    created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return (
        f"# created: {created}\n"
        f"# public key: {identity.recipient.to_string()}\n"
        f"{identity.to_string()}\n"
    )


def read_identities(path: Path) -> list[age.KeyIdentity]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RepoError(f"{path}: no such identity file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RepoError(f"{path}: cannot read identity file: {e}") from e
    return age.parse_identities(text)


@dataclass
class Repo:
    path: Path
    config: Config

    @property
    def files(self) -> RepoLayout:
        return RepoLayout(self.path)

    def identities(self) -> list[age.KeyIdentity]:
        return read_identities(self.files.identity)

    def recipient(self) -> str:
        return self.identities()[0].recipient.to_string()

    def open_backend(self) -> KuboNode:
        """Start the embedded Kubo node of this repo (a child process)."""
        from fusenode.storage.kubo import KuboNode

        return KuboNode(self.path, swarm=swarm_settings(self.config))

    def node_identity(self) -> NodeIdentity:
        """Peer ID and the addresses peers should dial, from the repo's files, without
        starting Kubo: the announced addresses if any, else the configured listen address
        (a daemon reports the addresses of every interface of 0.0.0.0 instead)."""
        kubo_config = self.files.kubo_config
        try:
            peer_id = json.loads(kubo_config.read_text())["Identity"]["PeerID"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise RepoError(f"{kubo_config}: cannot read the node identity ({e})") from e
        node = self.config.node
        host = ipaddress.ip_address(node.swarm_host)
        listen = (f"/ip{host.version}/{host}/tcp/{node.swarm_port}",)
        addresses = node.announce or listen
        return NodeIdentity(peer_id, tuple(f"{a}/p2p/{peer_id}" for a in addresses))

    @classmethod
    def open(cls, path: Path) -> Repo:
        if not RepoLayout(path).config.exists():
            raise RepoError(f"{path}: not a fusenode repo (run `fusenode init --repo {path}`)")
        return cls(path, load_config(RepoLayout(path).config))

    @classmethod
    def init(
        cls,
        path: Path,
        swarm_port: int | None = None,
        api_port: int | None = None,
        swarm_host: str = "127.0.0.1",
        post_quantum: bool = False,
    ) -> Repo:
        """Create a repo: identity, Kubo repo configured for ``swarm_host``, config.toml.

        ``post_quantum``: the node's identity is an mlkem768x25519 key (``age1pq1...``), so
        what is stored for the node by default resists a future quantum computer."""
        files = RepoLayout(path)
        if files.config.exists():
            raise RepoError(f"{path}: already a fusenode repo")
        for name, port in (("--swarm-port", swarm_port), ("--api-port", api_port)):
            if port is not None and not 1 <= port <= 65535:
                raise RepoError(f"{name} {port} is not a TCP port (1-65535)")
        if swarm_port is not None and swarm_port == api_port:
            raise RepoError("--swarm-port and --api-port must differ")
        try:
            settings = SwarmSettings(host=swarm_host)
        except InvalidArgument as e:
            raise RepoError(f"--swarm-host: {e}") from None
        swarm = swarm_port or (
            free_loopback_port() if settings.loopback else free_tcp_port(swarm_host)
        )
        api = api_port or free_loopback_port()
        while api == swarm:
            api = free_loopback_port()
        try:
            path.mkdir(parents=True, exist_ok=True)
            files.tmp.mkdir(exist_ok=True)
            os.chmod(path, 0o700)
        except OSError as e:
            raise RepoError(f"{path}: cannot create repo: {e.strerror}") from e
        created_identity = False
        try:
            if not files.identity.exists():
                kind = age.MLKEM768X25519Identity if post_quantum else age.X25519Identity
                write_private(files.identity, identity_text(kind.generate()))
                created_identity = True
            from fusenode.storage.kubo import create_repo

            create_repo(path, swarm, swarm=settings)
            # config.toml last: its presence marks a complete repo.
            text = render_config(swarm, api, str(ipaddress.ip_address(swarm_host)))
            files.config.write_text(text, encoding="utf-8")
        except BaseException:
            if created_identity:
                with contextlib.suppress(OSError):
                    files.identity.unlink()
            raise
        return cls.open(path)
