"""`fusenode demo` runs to the end on real nodes and leaves nothing behind."""

from __future__ import annotations

import pytest

from tests.support.cli import clean_env


@pytest.mark.slow
def test_demo(cli, tmp_path):
    proc = cli("demo", timeout=300, env=clean_env(TMPDIR=str(tmp_path)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "byte-identical: True" in out
    assert "all 6 fragments of every segment answer again" in out
    assert "fused 54 BatchNorm, skipped 0" in out
    # the demo cleaned up after itself (a library writes a .ses file to TMPDIR: not ours)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("fusenode")] == []
