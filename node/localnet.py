"""A network of fusenode daemons on this machine, each a real process with its own repo and
ports: on 127.0.0.1, or one per host of `fusenode.node.netns.NamespaceHosts` (nodes on
"different machines"). Used by `fusenode demo`, the network tests and the benchmark.

Node 0 starts first; the others bootstrap to it. Config keys can be set per network (e.g. a
short repair threshold for a demo) before the daemons start. On namespace hosts each daemon,
and every command run for it (`LocalNetwork.cli`: the API is on the host's own 127.0.0.1),
runs inside its host's namespace; node i listens on its host's address, port 4001.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from fusenode.node.netns import NamespaceHosts
from fusenode.node.repo import Repo

READY_TIMEOUT = 60.0
#: The swarm and API ports of a node on a namespace host (each host has its own ports).
HOST_SWARM_PORT = 4001
HOST_API_PORT = 5001


def set_config(repo_path: Path, section: str, key: str, value: str) -> None:
    """Set ``key = value`` (TOML literal) in ``[section]`` of REPO/config.toml."""
    path = repo_path / "config.toml"
    text = path.read_text(encoding="utf-8")
    block = re.search(rf"^\[{re.escape(section)}\]\n(.*?)(?=^\[|\Z)", text, re.M | re.S)
    if block is None:
        text = text.rstrip("\n") + f"\n\n[{section}]\n{key} = {value}\n"
    else:
        body = block.group(1)
        line = re.compile(rf"^{re.escape(key)}\s*=.*$", re.M)
        if line.search(body):
            body = line.sub(lambda _m: f"{key} = {value}", body, count=1)
        else:
            body = f"{key} = {value}\n" + body
        text = text[: block.start(1)] + body + text[block.end(1) :]
    path.write_text(text, encoding="utf-8")


@dataclass
class LocalNode:
    index: int
    repo: Path
    proc: subprocess.Popen | None = None
    peer_id: str = ""
    multiaddr: str = ""
    api_url: str = ""
    log: list[str] = field(default_factory=list)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class LocalNetwork:
    def __init__(
        self,
        base: Path,
        count: int,
        config: dict[tuple[str, str], str] | None = None,
        hosts: NamespaceHosts | None = None,
        host_of: list[int] | None = None,
    ) -> None:
        self.host_of = host_of or list(range(count))
        if hosts is not None and (len(self.host_of) != count or max(self.host_of) >= hosts.count):
            raise ValueError(f"{count} nodes on {hosts.count} hosts: say which host each is on")
        self.base = Path(base)
        self.nodes = [LocalNode(i, self.base / f"node{i}") for i in range(count)]
        self.config = config or {}
        self.hosts = hosts

    def _prefix(self, i: int) -> list[str]:
        return self.hosts.exec_prefix(self.host_of[i]) if self.hosts is not None else []

    # -- lifecycle ---------------------------------------------------------------------------
    def init(self) -> None:
        def one(node: LocalNode) -> None:
            if not (node.repo / "config.toml").exists():
                if self.hosts is None:
                    Repo.init(node.repo)
                else:
                    # Several nodes on one host: each its own pair of ports.
                    host = self.host_of[node.index]
                    shift = self.host_of[: node.index].count(host)
                    address = self.hosts.address(host)
                    Repo.init(node.repo, HOST_SWARM_PORT + shift, HOST_API_PORT + shift, address)
            for (section, key), value in self.config.items():
                set_config(node.repo, section, key, value)

        with ThreadPoolExecutor(max_workers=len(self.nodes)) as pool:
            list(pool.map(one, self.nodes))

    def start(self) -> None:
        self.init()
        self.start_node(0)
        with ThreadPoolExecutor(max_workers=len(self.nodes)) as pool:
            list(pool.map(self.start_node, range(1, len(self.nodes))))

    def start_node(self, i: int, bootstrap: bool = True) -> LocalNode:
        """Start node ``i``'s daemon; it joins node 0 unless ``bootstrap`` is False (a
        restarted node must find the network from what its repo remembers)."""
        node = self.nodes[i]
        cmd = [*self._prefix(i), sys.executable, "-m", "fusenode.node.cli", "daemon"]
        cmd += ["--repo", str(node.repo)]
        if bootstrap and i != 0 and self.nodes[0].multiaddr:
            cmd += ["--bootstrap", self.nodes[0].multiaddr]
        env = {k: v for k, v in os.environ.items() if not k.startswith("FUSENODE_")}
        env["FUSENODE_LOG"] = os.environ.get("FUSENODE_LOG", "WARNING")
        node.log = []
        node.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
        )
        deadline = time.monotonic() + READY_TIMEOUT
        assert node.proc.stdout is not None
        for line in node.proc.stdout:
            line = line.rstrip("\n")
            node.log.append(line)
            if line.startswith("peer ID:"):
                node.peer_id = line.split(":", 1)[1].strip()
            elif line.startswith("swarm:") and not node.multiaddr:
                node.multiaddr = line.split(":", 1)[1].strip()
            elif line.startswith("api:"):
                node.api_url = line.split(":", 1)[1].strip()
            elif line == "ready":
                break
            if time.monotonic() > deadline:
                break
        else:
            raise RuntimeError(f"node {i} exited before it was ready:\n" + "\n".join(node.log))
        if line != "ready":
            raise RuntimeError(f"node {i} not ready in {READY_TIMEOUT} s")
        # Keep draining its output so the daemon never blocks on a full pipe.
        threading.Thread(target=self._drain, args=(node,), daemon=True).start()
        return node

    @staticmethod
    def _drain(node: LocalNode) -> None:
        proc = node.proc
        if proc is None or proc.stdout is None:
            return
        for line in proc.stdout:
            node.log.append(line.rstrip("\n"))
            del node.log[:-200]

    def kill(self, i: int, sig: int = signal.SIGKILL) -> None:
        """Stop a node abruptly (SIGKILL) or cleanly (SIGTERM); its whole process group goes."""
        node = self.nodes[i]
        if node.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.proc.pid, sig)
        try:
            node.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.proc.pid, signal.SIGKILL)
            node.proc.wait(timeout=10)
        if node.proc.stdout is not None:
            node.proc.stdout.close()
        if sig == signal.SIGKILL:  # a killed daemon cannot remove its api.json
            with contextlib.suppress(FileNotFoundError):
                (node.repo / "api.json").unlink()

    def stop(self) -> None:
        for node in self.nodes:
            if node.running:
                self.kill(node.index, signal.SIGTERM)

    def __enter__(self) -> LocalNetwork:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- driving nodes with the CLI ----------------------------------------------------------
    def cli(self, i: int, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FUSENODE_")}
        return subprocess.run(
            [
                *self._prefix(i),
                sys.executable,
                "-m",
                "fusenode.node.cli",
                *args,
                "--repo",
                str(self.nodes[i].repo),
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
