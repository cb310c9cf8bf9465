"""A node's repo: one folder holding everything the node owns.

    REPO/
      config.toml     the node's configuration (documented defaults + chosen ports)
      identity.txt    the node's age identity (mode 0600); its recipient is public
      kubo/           the embedded Kubo repo (storage.kubo), loopback-only by default
      kubo.log        Kubo's log
      tmp/            scratch space (fragments on their way into Kubo, partial downloads)

Default location ~/.fusenode, or FUSENODE_REPO, or --repo.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from fusenode.node.config import Config, load_config, render_config
from fusenode.node.errors import RepoError
from fusenode.storage import age

CONFIG_FILE = "config.toml"
IDENTITY_FILE = "identity.txt"
TMP_DIR = "tmp"


def default_repo_path(cli_value: str | None = None) -> Path:
    if cli_value:
        return Path(cli_value).expanduser()
    env = os.environ.get("FUSENODE_REPO")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".fusenode"


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_private(path: Path, text: str) -> None:
    """Create ``path`` with mode 0600 (never readable by others, not even briefly)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def identity_text(identity: age.X25519Identity) -> str:
    created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return (
        f"# created: {created}\n"
        f"# public key: {identity.recipient.to_string()}\n"
        f"{identity.to_string()}\n"
    )


def read_identities(path: Path) -> list[age.X25519Identity]:
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
    def identity_path(self) -> Path:
        return self.path / IDENTITY_FILE

    @property
    def tmp(self) -> Path:
        return self.path / TMP_DIR

    def identities(self) -> list[age.X25519Identity]:
        return read_identities(self.identity_path)

    def recipient(self) -> str:
        return self.identities()[0].recipient.to_string()

    def open_backend(self):
        """Start the embedded Kubo node of this repo (a child process)."""
        from fusenode.storage.kubo import KuboNode

        return KuboNode(self.path, self.config.node.swarm_port or None)

    @classmethod
    def open(cls, path: Path) -> Repo:
        if not (path / CONFIG_FILE).exists():
            raise RepoError(f"{path}: not a fusenode repo (run `fusenode init --repo {path}`)")
        return cls(path, load_config(path / CONFIG_FILE))

    @classmethod
    def init(cls, path: Path, swarm_port: int | None = None, api_port: int | None = None) -> Repo:
        if (path / CONFIG_FILE).exists():
            raise RepoError(f"{path}: already a fusenode repo")
        for name, port in (("--swarm-port", swarm_port), ("--api-port", api_port)):
            if port is not None and not 1 <= port <= 65535:
                raise RepoError(f"{name} {port} is not a TCP port (1-65535)")
        if swarm_port is not None and swarm_port == api_port:
            raise RepoError("--swarm-port and --api-port must differ")
        swarm = swarm_port or free_loopback_port()
        api = api_port or free_loopback_port()
        while api == swarm:
            api = free_loopback_port()
        try:
            path.mkdir(parents=True, exist_ok=True)
            (path / TMP_DIR).mkdir(exist_ok=True)
            os.chmod(path, 0o700)
        except OSError as e:
            raise RepoError(f"{path}: cannot create repo: {e.strerror}") from e
        created_identity = False
        try:
            if not (path / IDENTITY_FILE).exists():
                write_private(path / IDENTITY_FILE, identity_text(age.X25519Identity.generate()))
                created_identity = True
            from fusenode.storage.kubo import create_repo

            create_repo(path, swarm)
            # config.toml last: its presence marks a complete repo.
            (path / CONFIG_FILE).write_text(render_config(swarm, api), encoding="utf-8")
        except BaseException:
            if created_identity:
                with contextlib.suppress(OSError):
                    (path / IDENTITY_FILE).unlink()
            raise
        return cls.open(path)
