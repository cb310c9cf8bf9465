"""Post-quantum interop: typage (the age-encryption npm package by age's author, an
independent implementation of mlkem768x25519) reads what we write and we read what it writes.

pyrage (rage) has no mlkem768x25519 recipients in the version installed here (1.4), so typage
is the independent implementation; scripts/dev installs it (tests/interop, npm ci). Without
node or the package the tests skip, except under CI=true, where they must run. The CCTV
vectors (test_age_vectors.py) are the oracle that needs nothing installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from fusenode.storage import age
from fusenode.storage.manifest import padme
from fusenode.storage.store import put_file
from tests.support.fakes import FakeBackend

HERE = Path(__file__).resolve().parents[1] / "interop"
SCRIPT = HERE / "age-interop.mjs"


def _typage() -> list[str]:
    node = shutil.which("node")
    missing = (
        "node is not installed"
        if node is None
        else "typage is not installed (npm ci in tests/interop; scripts/dev does it)"
        if not (HERE / "node_modules" / "age-encryption").is_dir()
        else None
    )
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the post-quantum interop test is required under CI: {missing}")
        pytest.skip(missing)
    return [node, str(SCRIPT)]


def _run(*args: str, data: bytes = b"") -> bytes:
    proc = subprocess.run(
        [*_typage(), *args], input=data, capture_output=True, cwd=HERE, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc.stdout


@pytest.mark.parametrize("size", [0, 1000, 3 * age.CHUNK_SIZE + 7])
def test_typage_decrypts_our_post_quantum_files(size: int, tmp_path) -> None:
    ours = age.MLKEM768X25519Identity.generate()
    key = tmp_path / "key.txt"
    key.write_text(f"# test key\n{ours.to_string()}\n")
    data = os.urandom(size)
    assert _run("decrypt", str(key), data=age.encrypt(data, [ours.recipient])) == data
    # Among other stanzas (typage must skip the one that is not its own).
    stranger = age.MLKEM768X25519Identity.generate().recipient
    assert _run("decrypt", str(key), data=age.encrypt(data, [stranger, ours.recipient])) == data


def test_we_decrypt_typage_post_quantum_files_and_keys() -> None:
    identity_text, recipient = _run("keygen").decode().split()
    identity = age.parse_identity(identity_text)
    assert identity.recipient.to_string() == recipient  # same key derivation (expandKey)
    data = os.urandom(100_000)
    assert age.decrypt(_run("encrypt", recipient, data=data), [identity]) == data


def test_typage_reads_a_stored_version_3_model(tmp_path) -> None:
    """header || reassembled fragments of a put to a PQ key: typage decrypts it, and gets
    the model followed by its zero padding."""
    from fusenode.storage.erasure import ErasureCoder

    ours = age.MLKEM768X25519Identity.generate()
    key = tmp_path / "key.txt"
    key.write_text(ours.to_string() + "\n")
    data = os.urandom(50_000)
    src = tmp_path / "m.onnx"
    src.write_bytes(data)
    backend = FakeBackend()
    m = put_file(src, backend, recipients=[ours.recipient], segment_size=8192).manifest
    coder = ErasureCoder(m.erasure.k, m.erasure.n)
    payload = b"".join(
        coder.decode({f.index: backend.blocks[f.cid] for f in s.fragments}, s.size)
        for s in m.segments
    )
    plain = _run("decrypt", str(key), data=m.age_header + payload)
    assert plain == data + bytes(padme(len(data)) - len(data))
