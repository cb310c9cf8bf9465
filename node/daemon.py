"""`fusenode daemon`: the embedded Kubo node, the peer API and the local HTTP API in one
process, until SIGINT or SIGTERM.

Start-up order: open state (SQLite) -> start Kubo (its own child process) -> serve the peer
API on a private loopback port and expose it over libp2p -> serve the local API -> write
REPO/api.token (0600, kept across restarts) and REPO/api.json (how clients find us) -> print
peer ID, swarm multiaddr and API URL -> join bootstrap peers (retried until they answer) ->
repair loop. Shutdown reverses it and removes api.json, so a stale file never points at a
dead daemon for long (clients also check the pid).
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
from pathlib import Path

from aiohttp import web
from fusenode.node.repo import Repo, write_private

API_JSON = "api.json"
API_TOKEN = "api.token"
BOOTSTRAP_RETRY = 5.0
log = logging.getLogger("fusenode.daemon")


def load_or_create_token(repo: Repo) -> str:
    path = repo.path / API_TOKEN
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


async def _bootstrap(service, addresses: list[str], stop: asyncio.Event) -> None:
    """Dial every bootstrap peer; retry the ones that fail until they answer or we stop."""
    pending = list(dict.fromkeys(addresses))
    while pending and not stop.is_set():
        still = []
        for addr in pending:
            try:
                await service.connect(addr, timeout=10.0)
                log.info("joined %s", addr)
            except Exception as e:
                log.info("bootstrap %s: %s (retrying)", addr, e)
                still.append(addr)
        pending = still
        if pending:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=BOOTSTRAP_RETRY)


async def run_daemon(repo: Repo, bootstrap: list[str]) -> int:
    from fusenode.node.api import create_app
    from fusenode.node.peerauth import load_private_key
    from fusenode.node.peering import PROTOCOL, PeerClient, create_peer_app, free_port
    from fusenode.node.service import NodeService
    from fusenode.node.state import State

    config = repo.config
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    state = State(repo.path / "state.db")
    runners: list[web.AppRunner] = []
    tasks: list[asyncio.Task] = []
    kubo = None
    client = None
    api_json = repo.path / API_JSON
    try:
        kubo = await asyncio.to_thread(repo.open_backend)
        key = load_private_key(repo.path / "kubo")
        client = PeerClient(kubo, key)
        service = NodeService(repo, kubo, state, client)
        service.loop = loop

        peer_port = free_port()
        runners.append(
            await _serve(
                create_peer_app(service, config.network.accept_from), "127.0.0.1", peer_port
            )
        )
        await asyncio.to_thread(
            kubo.transport.p2p_listen, PROTOCOL, f"/ip4/127.0.0.1/tcp/{peer_port}"
        )

        token = load_or_create_token(repo)
        app = create_app(service, token=token, max_body_bytes=config.api.max_body_bytes)
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

        swarm = [a for a in service.addresses if "/127.0.0.1/" in a] or service.addresses
        print(f"peer ID: {service.peer_id}")
        for addr in swarm:
            print(f"swarm:   {addr}")
        print(f"api:     {url}")
        print("ready", flush=True)

        tasks.append(
            asyncio.create_task(_bootstrap(service, [*config.network.bootstrap, *bootstrap], stop))
        )
        tasks.append(asyncio.create_task(service.repair_loop(stop)))
        tasks.append(asyncio.create_task(service.keep_connected(stop)))
        tasks.append(asyncio.create_task(service.optimizer.run_forever(stop)))
        tasks.append(asyncio.create_task(service.optimizer.listen(stop)))
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
        if client is not None:
            await client.close()
        if kubo is not None:
            await asyncio.to_thread(kubo.close)
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
