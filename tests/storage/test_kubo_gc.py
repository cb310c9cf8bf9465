"""The blockstore walker and sweep (`fusenode.storage.kubo.gc`) on a flatfs folder made by
hand: dag-pb links as CIDv0 and CIDv1 (dag-pb and raw), a link to a block not on disk, a
non-canonical node with its Data before its Links, garbage and temporary files."""

from __future__ import annotations

import hashlib
from pathlib import Path

from fusenode.storage.kubo import flatfs_path
from fusenode.storage.kubo.gc import KUBO_MFS_ROOT, sweep, usage
from fusenode.storage.multiformats import b32encode, b58encode, encode_varint


def _field(number: int, payload: bytes) -> bytes:
    return encode_varint(number << 3 | 2) + encode_varint(len(payload)) + payload


def _mh(block: bytes) -> bytes:
    return b"\x12\x20" + hashlib.sha256(block).digest()


def _v0(block: bytes) -> str:
    return b58encode(_mh(block))


def _v1(block: bytes, codec: int) -> tuple[str, bytes]:
    raw = b"\x01" + encode_varint(codec) + _mh(block)
    return "b" + b32encode(raw), raw


def _node(links: list[bytes], data: bytes = b"\x08\x02", data_first: bool = False) -> bytes:
    parts = [_field(2, _field(1, h) + encode_varint(3 << 3) + encode_varint(1)) for h in links]
    body = b"".join(parts)
    return _field(1, data) + body if data_first else body + _field(1, data)


def _put(kubo: Path, block: bytes, cid: str | None = None) -> Path:
    path = flatfs_path(kubo, cid or _v0(block))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(block)
    return path


def test_sweep_keeps_what_the_roots_reach_and_deletes_the_rest(tmp_path: Path) -> None:
    kubo = tmp_path / "kubo"
    leaf = _field(1, b"\x08\x02\x12\x05hello")
    raw_leaf = b"raw bytes " * 100
    raw_cid, raw_bin = _v1(raw_leaf, 0x55)
    missing = _node([])  # linked, never written
    inner = _node([_mh(leaf)], data_first=True)  # Data before Links: still walked
    inner_cid, inner_bin = _v1(inner, 0x70)
    root = _node([inner_bin, raw_bin, _mh(missing)])
    keep = [
        _put(kubo, root),
        _put(kubo, inner, inner_cid),
        _put(kubo, leaf),
        _put(kubo, raw_leaf, raw_cid),
        _put(kubo, b"\x0a\x02\x08\x01"),  # the empty folder: Kubo's MFS root
    ]
    assert _v0(b"\x0a\x02\x08\x01") == KUBO_MFS_ROOT
    garbage = [_put(kubo, _node([_mh(leaf)], b"\x08\x02\x18\x01")), _put(kubo, b"x" * 5000)]
    temp = kubo / "blocks" / "put-123456"  # a write Kubo never finished: not a block
    temp.write_bytes(b"partial")
    sizes = {p: p.stat().st_size for p in keep + garbage}

    measured = usage(kubo, [_v0(root)])
    assert measured.blockstore == sum(sizes.values())
    assert measured.pinned == sum(sizes[p] for p in keep)
    assert measured.pinned_blocks == len(keep)

    done = sweep(kubo, [_v0(root), "not a cid"])
    assert (done.removed_blocks, done.removed_bytes) == (2, sum(sizes[p] for p in garbage))
    assert all(p.exists() for p in keep) and not any(p.exists() for p in garbage)
    assert temp.exists()
    assert done.after.blockstore == done.after.pinned == measured.pinned
    assert done.before == measured

    # Nothing reaches them any more: only Kubo's own root stays.
    again = sweep(kubo, [])
    assert again.removed_blocks == len(keep) - 1
    assert again.after.blockstore == 4


def test_an_empty_or_missing_blockstore(tmp_path: Path) -> None:
    assert (
        usage(tmp_path / "nothing", ["QmUNLLsPACCz1vLxQVkXqqLX5R1X345qqfHbsf67hvA3Nn"]).blockstore
        == 0
    )
    assert sweep(tmp_path / "nothing", []).removed_blocks == 0


def test_collect_garbage_on_a_running_node(tmp_path: Path) -> None:
    """On a real embedded Kubo: what no pin reaches goes, what a pin reaches stays readable,
    a call made while the node is stopped for the sweep waits and then succeeds, and the node
    comes back with the same identity."""
    import os
    import threading

    from fusenode.storage.kubo import KuboNode

    with KuboNode(tmp_path / "repo") as kubo:
        identity = kubo.identity()
        kept, dropped = tmp_path / "kept", tmp_path / "dropped"
        kept.write_bytes(os.urandom(700_000))
        dropped.write_bytes(os.urandom(600_000))
        a, b = kubo.add(kept), kubo.add(dropped)
        kubo.unpin(b)
        assert kubo.disk_usage([a]).pinned < kubo.disk_usage([a]).blockstore
        results: list[str] = []
        waiting = threading.Thread(target=lambda: results.append(kubo.add_bytes(b"late")))
        original = kubo._process._spawn

        def slow_spawn(port):  # the call below is made while no child runs
            waiting.start()
            return original(port)

        kubo._process._spawn = slow_spawn  # type: ignore[method-assign]
        restarts: list[int] = []
        kubo.on_restart(lambda: restarts.append(1))
        swept = kubo.collect_garbage()
        assert restarts == []  # the planned restart after a sweep is no crash restart
        waiting.join(30)
        assert results and kubo.has_block(results[0])
        assert swept.removed_bytes >= 600_000 and swept.after.blockstore == swept.after.pinned
        assert not kubo.has_block(b) and kubo.has_block(a)
        assert kubo.fetch_bytes(a, 10.0) == kept.read_bytes()
        assert kubo.identity() == identity
