"""`fusenode demo` runs to the end on real nodes and leaves nothing behind."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUSENODE_")}
    env["TMPDIR"] = str(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "fusenode.node.cli", "demo"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "byte-identical: True" in out
    assert "all 6 fragments of every segment answer again" in out
    assert "fused 54 BatchNorm, skipped 0" in out
    # the demo cleaned up after itself (a library writes a .ses file to TMPDIR: not ours)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("fusenode")] == []
