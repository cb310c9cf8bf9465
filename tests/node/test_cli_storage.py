"""`fusenode keygen/init/put/get` on a real embedded Kubo node (127.0.0.1 only).

Damage is done to the real blockstore on disk: Kubo does not re-verify its own blocks, so
these tests show that fusenode's own hash checks catch it.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tomllib

import pyrage
import pytest

from fusenode.system import free_loopback_port as free_port
from tests.support.cli import Cli, assert_clean_error, assert_ok, clean_env

pytestmark = pytest.mark.slow


fusenode = Cli()
ok = assert_ok
clean_error = assert_clean_error


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    path = tmp_path_factory.mktemp("node") / "repo"
    ok(fusenode("init", "--repo", path))
    cfg = path / "config.toml"
    cfg.write_text(cfg.read_text().replace("fetch_timeout = 60.0", "fetch_timeout = 3.0"))
    return path


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(os.urandom(300_000))
    return path


def put(repo, path, *extra):
    proc = ok(fusenode("put", path, "--repo", repo, *extra))
    return proc.stdout.strip().splitlines()[-1]


def test_init(repo):
    config = tomllib.loads((repo / "config.toml").read_text())
    assert config["api"]["host"] == "127.0.0.1" and config["api"]["port"] > 0
    assert config["node"]["swarm_port"] > 0
    assert stat.S_IMODE((repo / "identity.txt").stat().st_mode) == 0o600
    import json

    kubo = json.loads((repo / "kubo" / "config").read_text())
    assert kubo["Bootstrap"] == [] and kubo["Discovery"]["MDNS"]["Enabled"] is False
    assert all("127.0.0.1" in a for a in kubo["Addresses"]["Swarm"])
    clean_error(fusenode("init", "--repo", repo), "already")


def test_default_repo_is_fusenode_repo_or_home(tmp_path):
    """No --repo: $FUSENODE_REPO if set, else ~/.fusenode; ports given on the command line
    are the ones configured."""
    base = clean_env()

    def init(env, *extra):
        return ok(fusenode("init", *extra, env=env))

    init({**base, "FUSENODE_REPO": str(tmp_path / "from-env")})
    assert (tmp_path / "from-env" / "config.toml").is_file()
    home = tmp_path / "home"
    home.mkdir()
    swarm, api = free_port(), free_port()
    init({**base, "HOME": str(home)}, "--swarm-port", swarm, "--api-port", api)
    config = tomllib.loads((home / ".fusenode" / "config.toml").read_text())
    assert config["node"]["swarm_port"] == swarm and config["api"]["port"] == api


def test_keygen(tmp_path):
    key = tmp_path / "key.txt"
    proc = ok(fusenode("keygen", "-o", key))
    recipient = proc.stdout.strip().splitlines()[-1]
    assert recipient.startswith("age1")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    identity = next(x for x in key.read_text().splitlines() if x.startswith("AGE-SECRET-KEY-1"))
    rage = pyrage.x25519.Identity.from_str(identity)
    assert str(rage.to_public()) == recipient
    clean_error(fusenode("keygen", "-o", key), "already exists")
    # Without -o, as age-keygen: stdout is an identity file, the recipient on stderr too.
    proc = ok(fusenode("keygen"))
    lines = proc.stdout.splitlines()
    assert lines[-1].startswith("AGE-SECRET-KEY-1") and all(x.startswith("#") for x in lines[:-1])
    assert f"# public key: {proc.stderr.split('Public key: ')[1].strip()}" in lines


def test_put_get_round_trip(repo, model, tmp_path):
    cid = put(repo, model)
    assert cid.startswith("Qm")
    out = tmp_path / "out.onnx"
    proc = ok(fusenode("get", cid, "-o", out, "--repo", repo))
    assert out.read_bytes() == model.read_bytes()
    assert "\r" not in proc.stderr  # piped: no progress bar drawn


def test_other_recipient_and_identity(repo, model, tmp_path):
    key = tmp_path / "alice.txt"
    alice = ok(fusenode("keygen", "-o", key)).stdout.strip().splitlines()[-1]
    cid = put(repo, model, "--recipient", alice, "-k", "3", "-n", "5")
    out = tmp_path / "out"
    clean_error(fusenode("get", cid, "-o", out, "--repo", repo), "no identity matches")
    assert not out.exists()
    ok(fusenode("get", cid, "-o", out, "--repo", repo, "--identity", key))
    assert out.read_bytes() == model.read_bytes()


def test_info_hides_the_sealed_fields_of_a_model_the_node_itself_can_read(repo, model):
    """A plain put is sealed to the node's own key; info without --identity still shows only
    what any CID holder sees. The node's key opens the rest when given."""
    import json

    cid = put(repo, model)
    info = json.loads(ok(fusenode("info", cid, "--repo", repo, "--json")).stdout)
    assert info["encrypted"] and info["size_hidden"] and not info["readable"]
    assert info["metadata"] is None and info["created"] is None and info["parent"] is None
    text = json.dumps(info)
    assert str(model.stat().st_size) not in text and model.name not in text
    own = repo / "identity.txt"
    info = json.loads(ok(fusenode("info", cid, "--repo", repo, "--json", "--identity", own)).stdout)
    assert info["readable"] and info["metadata"]["size"] == model.stat().st_size
    assert info["metadata"]["name"] == model.name and info["created"]


def test_post_quantum_keygen_put_get_share_and_info(repo, model, tmp_path):
    """The issue's contract: keygen --pq, put --recipient age1pq1..., get --identity with a PQ
    key, share to a PQ recipient, and info without a key shows no exact size, name,
    creation time or parent (format version 3)."""
    import json

    key = tmp_path / "pq.txt"
    proc = ok(fusenode("keygen", "--pq", "-o", key))
    recipient = proc.stdout.strip().splitlines()[-1]
    assert recipient.startswith("age1pq1") and stat.S_IMODE(key.stat().st_mode) == 0o600
    assert "AGE-SECRET-KEY-PQ-1" in key.read_text()
    cid = put(repo, model, "--recipient", recipient)
    out = tmp_path / "out"
    clean_error(fusenode("get", cid, "-o", out, "--repo", repo), "no identity matches")
    ok(fusenode("get", cid, "-o", out, "--repo", repo, "--identity", key))
    assert out.read_bytes() == model.read_bytes()

    info = json.loads(ok(fusenode("info", cid, "--repo", repo, "--json")).stdout)
    assert info["version"] == 3 and info["size_hidden"] and not info["readable"]
    assert info["created"] is None and info["parent"] is None and info["metadata"] is None
    size = model.stat().st_size
    assert info["payload_size"] > size + 1000  # the padded bucket, not the size
    text = json.dumps(info)
    assert str(size) not in text and model.name not in text
    info = json.loads(ok(fusenode("info", cid, "--repo", repo, "--json", "--identity", key)).stdout)
    assert info["readable"] and info["metadata"]["size"] == size and info["created"]
    assert info["metadata"]["name"] == model.name

    friend = tmp_path / "friend.txt"
    other = ok(fusenode("keygen", "--pq", "-o", friend)).stdout.strip().splitlines()[-1]
    shared = (
        ok(fusenode("share", cid, "--recipient", other, "--identity", key, "--repo", repo))
        .stdout.strip()
        .splitlines()[-1]
    )
    ok(fusenode("get", shared, "-o", tmp_path / "o2", "--repo", repo, "--identity", friend))
    assert (tmp_path / "o2").read_bytes() == model.read_bytes()


def test_post_quantum_keygen_to_stdout_tiny_file_and_recipient_mistakes(repo, tmp_path):
    """`keygen --pq > FILE` is an identity file; a 1-byte model's info shows only the
    4096-byte minimum bucket; the same key twice is one stanza; an upper-case key, a PQ +
    classic mix and too many PQ keys are refused at once with a plain sentence (rc 2)."""
    import json

    proc = ok(fusenode("keygen", "--pq"))
    key = tmp_path / "pq.txt"
    key.write_text(proc.stdout)
    recipient = proc.stderr.split("Public key: ")[1].strip()
    assert recipient.startswith("age1pq1") and f"# public key: {recipient}\n" in proc.stdout
    tiny = tmp_path / "tiny.bin"
    tiny.write_bytes(b"x")
    cid = put(repo, tiny, "--recipient", recipient, "--recipient", recipient)
    info = json.loads(ok(fusenode("info", cid, "--repo", repo, "--json")).stdout)
    assert info["payload_size"] == 16 + 4096 + 16  # the minimum bucket: every file <= 4 KiB
    assert info["metadata"] is None and "tiny.bin" not in json.dumps(info)
    ok(fusenode("get", cid, "-o", tmp_path / "o", "--repo", repo, "--identity", key))
    assert (tmp_path / "o").read_bytes() == b"x"

    proc = clean_error(fusenode("put", tiny, "--repo", repo, "--recipient", recipient.upper()))
    assert "lower case" in proc.stderr and "does not match" not in proc.stderr
    assert proc.returncode == 2
    classic = ok(fusenode("keygen", "-o", tmp_path / "c.txt")).stdout.strip().splitlines()[-1]
    mix = ("--recipient", recipient, "--recipient", classic)
    clean_error(fusenode("put", tiny, "--repo", repo, *mix), "cannot share a model", code=2)
    from fusenode.storage import age

    many = [age.MLKEM768X25519Identity.generate().recipient.to_string() for _ in range(46)]
    args = [a for r in many for a in ("--recipient", r)]
    clean_error(fusenode("put", tiny, "--repo", repo, *args), "post-quantum recipients fit", code=2)


def test_post_quantum_node_identity(tmp_path, model):
    path = tmp_path / "pqrepo"
    proc = ok(fusenode("init", "--pq", "--repo", path))
    assert "recipient: age1pq1" in proc.stdout
    assert "AGE-SECRET-KEY-PQ-1" in (path / "identity.txt").read_text()
    cid = put(path, model)  # to the node's own (post-quantum) key by default
    ok(fusenode("get", cid, "-o", tmp_path / "o", "--repo", path))
    assert (tmp_path / "o").read_bytes() == model.read_bytes()


@pytest.mark.parametrize(("k", "n"), [("4", "4"), ("0", "3"), ("5", "65"), ("x", "6")])
def test_invalid_k_n(repo, model, k, n):
    proc = fusenode("put", model, "--repo", repo, "-k", k, "-n", n)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr


def test_bad_files(repo, tmp_path):
    clean_error(fusenode("put", tmp_path / "missing", "--repo", repo), "no such file")
    (tmp_path / "empty").touch()
    clean_error(fusenode("put", tmp_path / "empty", "--repo", repo), "empty")
    clean_error(fusenode("put", tmp_path, "--repo", repo), "directory")
    clean_error(fusenode("put", tmp_path / "x", "--repo", tmp_path / "nope"), "not a fusenode")


def test_bad_cids(repo, tmp_path):
    out = tmp_path / "o"
    clean_error(fusenode("get", "not-a-cid", "-o", out, "--repo", repo))
    unknown = "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG"
    clean_error(fusenode("get", unknown, "-o", out, "--repo", repo), "not found")
    assert not out.exists()


def _block_files_containing(repo, needle: bytes):
    hits = []
    for root, _, files in os.walk(repo / "kubo" / "blocks"):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                if needle in f.read():
                    hits.append(path)
    return hits


def _corrupt(repo, content: bytes) -> None:
    needle = content[200:232]
    hits = _block_files_containing(repo, needle)
    assert len(hits) == 1
    with open(hits[0], "rb") as f:
        data = bytearray(f.read())
    data[data.index(needle) + 5] ^= 0xFF
    os.chmod(hits[0], 0o644)
    with open(hits[0], "wb") as f:
        f.write(data)


def _manifest(repo, cid):
    from fusenode.storage.kubo import KuboNode
    from fusenode.storage.manifest import Manifest

    with KuboNode(repo) as node:
        manifest = Manifest.from_bytes(node.fetch_bytes(cid, 10))
        blobs = {f.cid: node.fetch_bytes(f.cid, 10) for f in manifest.segments[0].fragments}
    return manifest, blobs


def test_corrupted_blocks_on_disk(repo, tmp_path):
    src = tmp_path / "m.bin"
    src.write_bytes(os.urandom(200_000))  # one segment, 4-of-6, fragments of ~50 KB
    cid = put(repo, src)
    manifest, blobs = _manifest(repo, cid)
    frags = manifest.segments[0].fragments
    _corrupt(repo, blobs[frags[1].cid])  # one data fragment silently damaged
    out = tmp_path / "o"
    ok(fusenode("get", cid, "-o", out, "--repo", repo))
    assert out.read_bytes() == src.read_bytes()  # detected and replaced by a parity fragment
    for f in frags[2:4] + frags[4:5]:  # now 4 of 6 bad: fewer than k remain
        _corrupt(repo, blobs[f.cid])
    out2 = tmp_path / "o2"
    clean_error(fusenode("get", cid, "-o", out2, "--repo", repo), "fragments")
    assert not out2.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o2")]


def test_corrupted_manifest_on_disk(repo, tmp_path):
    src = tmp_path / "m.bin"
    src.write_bytes(os.urandom(50_000))
    cid = put(repo, src)
    from fusenode.storage.kubo import KuboNode

    with KuboNode(repo) as node:
        raw = node.fetch_bytes(cid, 10)
    _corrupt(repo, raw)
    clean_error(fusenode("get", cid, "-o", tmp_path / "o", "--repo", repo), "corrupted")


def _on_terminal(*args, sized=True, timeout=120):
    """Run fusenode with stderr on a pseudo-terminal (stdout piped); return (proc, stderr)."""
    import fcntl
    import pty
    import struct
    import termios

    env = clean_env()
    leader, follower = pty.openpty()
    if sized:  # 24 x 100, as a user's terminal would be; a fresh pty reports no size
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fusenode.node.cli", *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=follower,
            text=True,
            env=env,
        )
        os.close(follower)
        chunks = []
        while True:
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        out, _ = proc.communicate(timeout=timeout)
    finally:
        os.close(leader)
    proc.stdout_text = out
    return proc, b"".join(chunks).decode(errors="replace")


def test_progress_bars_on_a_terminal(repo, tmp_path):
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(24 << 20))
    proc, err = _on_terminal("put", src, "--repo", repo)
    assert proc.returncode == 0, err
    assert "put" in err and "\r" in err and "%" in err  # a tqdm bar was drawn and updated
    cid = proc.stdout_text.strip().splitlines()[-1]
    assert cid.startswith("Qm")  # stdout stays clean for scripts
    out = tmp_path / "out.bin"
    proc, err = _on_terminal("get", cid, "-o", out, "--repo", repo, sized=False)
    assert proc.returncode == 0, err
    assert "get" in err and "\r" in err and "%" in err
    assert out.read_bytes() == src.read_bytes()


def test_gc_and_rm_without_a_daemon(tmp_path):
    """`fusenode gc` and `fusenode rm` on a repo no daemon serves: the same use cases, run on
    the repo (its Kubo started for the call)."""
    import json

    path = tmp_path / "repo"
    ok(fusenode("init", "--repo", path))
    src = tmp_path / "m.bin"
    src.write_bytes(os.urandom(1_500_000))
    cid = put(path, src)
    blocks = path / "kubo" / "blocks"

    def on_disk() -> int:
        return sum(f.stat().st_size for f in blocks.glob("*/*.data"))

    first = json.loads(ok(fusenode("gc", "--repo", path, "--json")).stdout)
    assert first["blockstore_after"] == on_disk() == first["pinned_after"] > 1_500_000
    assert set(first) >= {"removed_blocks", "removed_bytes", "seconds", "started"}

    out = ok(fusenode("rm", cid, "--repo", path)).stdout
    assert "blocks are reclaimed at the next gc" in out
    assert on_disk() == first["blockstore_after"]  # rm unpins; the blocks wait for gc
    human = ok(fusenode("gc", "--repo", path)).stdout
    assert human.startswith("removed ") and on_disk() == 4  # Kubo's own root
    # The summary without a daemon shows the last gc the state kept.
    summary = json.loads(ok(fusenode("status", "--repo", path, "--json")).stdout)
    last = summary["activity"]["gc"]["last"]
    assert last["summary"]["blockstore_after"] == 4 and last["summary"]["freed_bytes"] > 1_500_000
    assert summary["storage"]["blockstore_bytes"] == 4
    clean_error(fusenode("rm", cid, "--repo", path), "not a model this node placed", 4)
    clean_error(fusenode("rm", "not-a-cid", "--repo", path), "malformed CID", 2)


def test_output_into_a_closed_pipe_is_quiet(repo):
    """`fusenode ls --json | head -1` style: the reader is gone before the output is written:
    no error message, no traceback."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "fusenode.node.cli", "status", "--repo", str(repo), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean_env(),
    )
    proc.stdout.close()  # type: ignore[union-attr]
    with proc.stderr:  # type: ignore[union-attr]
        err = proc.stderr.read().decode()  # type: ignore[union-attr]
    assert proc.wait(60) != 0
    assert "error" not in err.lower() and "Traceback" not in err, err
