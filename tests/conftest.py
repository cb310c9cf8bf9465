"""Fixtures shared by the whole suite.

Layout: tests/storage, tests/passes and tests/node test their package; tests/support holds
helpers that are not tests (in-memory fakes, ONNX model builders, keys). Tests on real nodes
start them here: `cli` runs the ``fusenode`` command line as a user would (a new process,
no FUSENODE_* variable leaking in), `network` starts several real daemons on 127.0.0.1, and
`host_network` one daemon on each of several hosts made of network namespaces.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fusenode.system import free_loopback_port
from tests.support.cli import Cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def project_root() -> Path:
    """The checkout: docs/, config.toml, README.md."""
    return ROOT


@pytest.fixture(scope="session")
def free_port() -> Callable[[], int]:
    """A function giving a TCP port free on 127.0.0.1 now."""
    return free_loopback_port


@pytest.fixture(scope="session")
def cli() -> Cli:
    """``cli("put", FILE, "--repo", REPO)``, ``cli.ok(...)``, ``cli.fails(..., text=...)``."""
    return Cli()


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Any]]:
    """``network(count, config={(section, key): toml_value}, per_node={i: config})``: a
    started LocalNetwork of real daemons (own repos and ports, 127.0.0.1 only), stopped when
    the module's tests are done."""
    from fusenode.node.localnet import LocalNetwork, set_config

    started: list[LocalNetwork] = []

    def start(
        count: int,
        config: dict[tuple[str, str], str] | None = None,
        per_node: dict[int, dict[tuple[str, str], str]] | None = None,
    ) -> LocalNetwork:
        net = LocalNetwork(tmp_path_factory.mktemp("net"), count, config)
        started.append(net)
        net.init()
        for i, settings in (per_node or {}).items():
            for (section, key), value in settings.items():
                set_config(net.nodes[i].repo, section, key, value)
        net.start()
        return net

    yield start
    for net in started:
        net.stop()


@pytest.fixture(scope="module")
def host_network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Any]]:
    """``host_network(count, config, host_of=None)``: a started LocalNetwork with one daemon
    on each of ``count`` hosts (or node i on host ``host_of[i]``) made of Linux network
    namespaces (one private /24, nothing added to the
    machine's network; ``net.hosts.cut(i)`` / ``restore(i)`` take a host's link down and up).
    Everything is torn down after the module's tests, whatever happened. Where namespaces
    cannot be made (not root), the tests skip with the reason, except under CI=true, where
    that is a failure: CI runs as root and must run them."""
    from fusenode.node.localnet import LocalNetwork
    from fusenode.node.netns import NamespaceHosts, unavailable

    reason = unavailable()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"namespace hosts are required under CI: {reason}")
        pytest.skip(f"namespace hosts: {reason}")
    made: list[tuple[LocalNetwork, NamespaceHosts]] = []

    def start(
        count: int,
        config: dict[tuple[str, str], str] | None = None,
        host_of: list[int] | None = None,
    ) -> LocalNetwork:
        hosts_needed = max(host_of) + 1 if host_of else count
        hosts = NamespaceHosts(hosts_needed, prefix=f"fn{os.getpid()}x{len(made)}")
        net = LocalNetwork(
            tmp_path_factory.mktemp("hosts"), count, config, hosts=hosts, host_of=host_of
        )
        made.append((net, hosts))
        hosts.create()
        net.start()
        return net

    try:
        yield start
    finally:
        for net, hosts in made:
            try:
                net.stop()
            finally:
                hosts.destroy()
