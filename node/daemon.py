"""`fusenode daemon`: the embedded Kubo node, the peer API and the local HTTP API in one
process, until SIGINT or SIGTERM.

`wire` builds the node's components (each with one job; docs/design.md draws them) and
`run_daemon` serves them. Start-up order: open state (SQLite) -> start Kubo (its own child
process) -> serve the peer API on a private loopback port and expose it over libp2p -> serve
the local API -> write REPO/api.token (0600, kept across restarts) and REPO/api.json (how
clients find us) -> print peer ID, swarm multiaddr and API URL -> join bootstrap peers
(retried until they answer) -> repair, audit, keep-connected, optimizer, lease and gc loops. Shutdown reverses
it and removes api.json, so a stale file never points at a dead daemon for long (clients
also check the pid).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from fusenode import defaults
from fusenode.node.aio import AsyncBlocks, AsyncTransport, Bridge
from fusenode.node.allocator import Allocator
from fusenode.node.auditor import Auditor
from fusenode.node.config import swarm_settings
from fusenode.node.context import NodeContext
from fusenode.node.domains import domain_function
from fusenode.node.holder import Holder, Limits
from fusenode.node.leases import Leases
from fusenode.node.monitor import AddressPolicy, PeerMonitor
from fusenode.node.network import PeerNetwork
from fusenode.node.optimizer import Announcer, Optimizer
from fusenode.node.peer_client import PeerClient
from fusenode.node.placement import Placer
from fusenode.node.repair import Repairer
from fusenode.node.repo import Repo, write_private
from fusenode.node.service import NodeService
from fusenode.node.state import State
from fusenode.storage.kubo import KuboNode

__all__ = ["Components", "main", "run_daemon", "wire"]

log = logging.getLogger(__name__)


@dataclass
class Components:
    service: NodeService
    holder: Holder
    monitor: PeerMonitor
    repairer: Repairer
    auditor: Auditor
    optimizer: Optimizer
    client: PeerClient
    leases: Leases


def wire(repo: Repo, kubo: KuboNode, state: State, bridge: Bridge) -> Components:
    """The daemon's components around one embedded Kubo node and one state database."""
    from fusenode.node.peerauth import load_private_key

    config = repo.config
    swarm = swarm_settings(config)
    blocks = AsyncBlocks(kubo, bridge)
    transport = AsyncTransport(kubo.transport, bridge)
    identity = kubo.identity()
    ctx = NodeContext(identity.peer_id, blocks, state, repo.files.tmp)
    key = load_private_key(repo.files.kubo)
    client = PeerClient(transport, key, ctx.gate)
    addresses = AddressPolicy(swarm.loopback, config.network.deny)
    unreachable_after = config.repair.unreachable_after
    monitor = PeerMonitor(ctx, client, unreachable_after=unreachable_after, addresses=addresses)
    placer = Placer(ctx, client, config.placement.pin_timeout)
    network = PeerNetwork(ctx, monitor, placer, Announcer(transport, config.optimizer.announce))
    domain = config.placement.domain
    allocator = Allocator(
        domain_function(domain, swarm.loopback, identity.peer_id, identity.addresses, state)
    )
    service = NodeService(repo, ctx, network, allocator)
    fetch_timeout = config.storage.fetch_timeout
    service.repairer = Repairer(
        ctx, monitor, allocator, placer, service.manifest, fetch_timeout=fetch_timeout
    )
    service.optimizer = Optimizer(service, transport)
    limits = Limits(config.storage.capacity, config.storage.peer_quota)
    holder = Holder(ctx, key, recent=unreachable_after, limits=limits)
    # Counted and timed for /metrics: every pass, the loops' and those the API asks for.
    metrics = service.metrics
    service.repairer.run = metrics.instrument("repair", service.repairer.run)  # type: ignore[method-assign]
    auditor = Auditor(ctx, client, on_failure=service.repairer.run)
    auditor.run = metrics.instrument("audit", auditor.run)  # type: ignore[method-assign]
    service.auditor = auditor
    kubo.on_restart(metrics.kubo_restarted)
    leases = Leases(ctx, client, holder, lease_days=config.storage.lease_days)
    return Components(
        service, holder, monitor, service.repairer, auditor, service.optimizer, client, leases
    )


def _dialable(addresses: list[str], loopback: bool) -> list[str]:
    """The addresses worth telling peers: loopback ones on a loopback node, others else."""
    local = [a for a in addresses if a.startswith(("/ip4/127.", "/ip6/::1/"))]
    return (local if loopback else [a for a in addresses if a not in local]) or addresses


def load_or_create_token(repo: Repo) -> str:
    path = repo.files.api_token
    if path.exists():
        return path.read_text(encoding="utf-8").strip()
    token = secrets.token_urlsafe(32)
    write_private(path, token + "\n")
    return token


async def _serve(app: web.Application, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    return runner


async def _bootstrap(monitor: PeerMonitor, addresses: list[str], stop: asyncio.Event) -> None:
    """Dial every bootstrap peer, then meet the peers they know (peer exchange); retry the
    ones that fail until they answer or we stop."""
    pending = list(dict.fromkeys(addresses))
    while pending and not stop.is_set():
        still = []
        for addr in pending:
            try:
                await monitor.connect(addr, timeout=10.0)
                log.info("joined %s", addr)
            except Exception as e:
                log.info("bootstrap %s: %s (retrying)", addr, e)
                still.append(addr)
        if len(still) < len(pending):
            with contextlib.suppress(Exception):
                await monitor.discover()
        pending = still
        if pending:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=defaults.BOOTSTRAP_RETRY)


async def run_daemon(repo: Repo, bootstrap: list[str]) -> int:
    from fusenode.node.api import create_app
    from fusenode.node.peer_server import create_peer_app
    from fusenode.node.protocol import PROTOCOL
    from fusenode.system import free_loopback_port

    config = repo.config
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    state = State(repo.files.state)
    bridge = Bridge(loop)
    runners: list[web.AppRunner] = []
    tasks: list[asyncio.Task[None]] = []
    kubo: KuboNode | None = None
    parts: Components | None = None
    api_json = repo.files.api_json
    try:
        kubo = await bridge.run(repo.open_backend)
        parts = wire(repo, kubo, state, bridge)
        service = parts.service

        if legacy := await parts.holder.account_legacy_holds():
            log.info("accounted %d holds recorded before quotas", legacy)
        peer_port = free_loopback_port()
        gate = service.collector.ctx.gate
        peer_app = create_peer_app(parts.holder, config.network.accept_from, gate=gate)
        runners.append(await _serve(peer_app, "127.0.0.1", peer_port))
        await service.blocks.bridge.run(
            kubo.transport.p2p_listen, PROTOCOL, f"/ip4/127.0.0.1/tcp/{peer_port}"
        )

        token = load_or_create_token(repo)
        app = create_app(service, token=token, max_body_bytes=config.api.max_body_bytes, gate=gate)
        api_port = config.api.port
        try:
            runners.append(await _serve(app, config.api.host, api_port))
        except OSError as e:
            print(
                f"fusenode: error: API port {config.api.host}:{api_port}: {e.strerror}",
                file=sys.stderr,
            )
            return 1
        url = f"http://{config.api.host}:{api_port}"
        tmp = api_json.with_suffix(".tmp")
        tmp.write_text(json.dumps({"url": url, "pid": os.getpid(), "peer_id": service.peer_id}))
        os.replace(tmp, api_json)

        print(f"peer ID: {service.peer_id}")
        for addr in _dialable(service.addresses, swarm_settings(config).loopback):
            print(f"swarm:   {addr}")
        print(f"api:     {url}")
        print("ready", flush=True)

        joining = [*config.network.bootstrap, *bootstrap]
        tasks.append(asyncio.create_task(_bootstrap(parts.monitor, joining, stop)))
        tasks.append(asyncio.create_task(parts.repairer.run_forever(stop, config.repair.interval)))
        audit_every = config.repair.audit_interval
        tasks.append(asyncio.create_task(parts.auditor.run_forever(stop, audit_every)))
        tasks.append(asyncio.create_task(parts.monitor.keep_connected(stop)))
        tasks.append(asyncio.create_task(parts.optimizer.run_forever(stop)))
        tasks.append(asyncio.create_task(parts.optimizer.listen(stop)))
        tasks.append(asyncio.create_task(parts.leases.run_forever(stop)))
        gc_every = config.storage.gc_interval
        tasks.append(asyncio.create_task(service.collector.run_forever(stop, gc_every)))
        await stop.wait()
        print("stopping", flush=True)
        return 0
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        with contextlib.suppress(FileNotFoundError):
            api_json.unlink()
        for runner in reversed(runners):
            await runner.cleanup()
        if parts is not None:
            await parts.client.close()
        if kubo is not None:
            await bridge.run(kubo.close)
        bridge.close()
        state.close()


def main(repo_path: Path, bootstrap: list[str]) -> int:
    logging.basicConfig(
        level=os.environ.get("FUSENODE_LOG", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    repo = Repo.open(repo_path)
    from fusenode.node.client import find_daemon

    if find_daemon(repo.path) is not None:
        print(f"fusenode: error: a daemon is already running on {repo.path}", file=sys.stderr)
        return 1
    return asyncio.run(run_daemon(repo, bootstrap))
