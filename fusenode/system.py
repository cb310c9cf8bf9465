"""Small operating-system helpers the layers share."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path

__all__ = ["free_loopback_port", "free_tcp_port", "removed_on_error"]


def free_tcp_port(host: str) -> int:
    """A TCP port free on ``host`` right now (another process could still take it first).
    An address this machine does not have yet (a repo made for another network namespace)
    gets a port free on every interface here."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, 0))
        except OSError:
            sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
        return int(sock.getsockname()[1])


def free_loopback_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    return free_tcp_port("127.0.0.1")


@contextlib.contextmanager
def removed_on_error(path: Path) -> Iterator[Path]:
    """Yield ``path`` (a temporary file being written); delete it if the block fails, so a
    failed write leaves nothing behind."""
    try:
        yield path
    except BaseException:
        with contextlib.suppress(OSError):
            path.unlink()
        raise
