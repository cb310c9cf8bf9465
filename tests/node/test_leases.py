"""Leases on real daemons (separate processes, 127.0.0.1 only), with a lease of 17 s
(``[storage] lease_days`` takes fractions of a day): holders keep what its owner renews,
past the lease's length, and release it once the owner stops renewing."""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from tests.support.cli import assert_ok

pytestmark = pytest.mark.slow

LEASE_DAYS = 0.0002  # 17.3 s; renewed every 4.3 s
LEASE_S = LEASE_DAYS * 86400
CONFIG = {
    ("storage", "segment_size"): "262144",
    ("storage", "k"): "2",
    ("storage", "n"): "3",
    ("storage", "gc_interval"): "0.0",
    ("storage", "lease_days"): str(LEASE_DAYS),
}


def held_for(repo: Path, owner: str) -> set[str]:
    db = sqlite3.connect(repo / "state.db", timeout=10)
    try:
        return {r[0] for r in db.execute("SELECT cid FROM held WHERE owner = ?", (owner,))}
    finally:
        db.close()


def test_holders_keep_renewed_leases_and_release_lapsed_ones(network, tmp_path):
    net = network(3, CONFIG)
    src = tmp_path / "model.bin"
    src.write_bytes(os.urandom(600_000))
    cid = assert_ok(net.cli(0, "put", str(src), "--public")).stdout.strip().splitlines()[-1]
    owner = net.nodes[0].peer_id
    held = {i: held_for(net.nodes[i].repo, owner) for i in (1, 2)}
    assert all(cid in h and len(h) >= 3 for h in held.values())

    time.sleep(LEASE_S * 1.6)  # longer than a lease: only renewals keep the holds
    assert {i: held_for(net.nodes[i].repo, owner) for i in (1, 2)} == held
    assert_ok(net.cli(1, "get", cid, "-o", str(tmp_path / "out.bin")))

    net.kill(0, signal.SIGTERM)  # the owner goes away: nobody renews any more
    stopped = time.monotonic()
    deadline = stopped + LEASE_S * 4 + 30
    while time.monotonic() < deadline:
        if not any(held_for(net.nodes[i].repo, owner) for i in (1, 2)):
            break
        time.sleep(1.0)
    left = {i: held_for(net.nodes[i].repo, owner) for i in (1, 2)}
    assert left == {1: set(), 2: set()}, left
    # Not before the lease ran out: the last renewal was at most one renewal interval
    # before the owner stopped.
    assert time.monotonic() - stopped >= LEASE_S * 0.75
    # And gc takes the blocks back: nothing but Kubo's own root stays.
    for i in (1, 2):
        assert_ok(net.cli(i, "gc"))
        blocks = net.nodes[i].repo / "kubo" / "blocks"
        assert sum(f.stat().st_size for f in blocks.glob("*/*.data")) < 1024
