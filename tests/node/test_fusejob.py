"""The optimizer's fuse + verify child process and its limits (node/fusejob.py): a real
child on a real model, stopped when it runs too long or uses too much memory."""

from __future__ import annotations

import asyncio

import onnx
import pytest

from fusenode.node.fusejob import FuseJobError, auto_memory_limit, run_fuse_job
from tests.support.onnx_models import conv_bn

GiB = 1 << 30


@pytest.fixture
def model(tmp_path):
    m, _ = conv_bn(cin=8, cout=16)
    path = tmp_path / "in.onnx"
    onnx.save(m, path)
    return path


def _job(src, dst, **limits):
    args = {"device": "cpu", "max_seconds": 300.0, "max_memory": 8 * GiB} | limits
    return asyncio.run(run_fuse_job(src, dst, **args))


def test_the_child_fuses_and_verifies(model, tmp_path):
    report = _job(model, tmp_path / "out.onnx")
    assert report["n_fused"] == 1 and report["verify"]["ok"]
    assert report["peak_rss_bytes"] > 0
    assert (tmp_path / "out.onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx", "out.onnx"]  # no leftovers


def test_a_child_past_its_time_is_stopped(model, tmp_path):
    with pytest.raises(FuseJobError, match=r"ran past 0 s \(\[optimizer\] max_seconds\)") as info:
        _job(model, tmp_path / "out.onnx", max_seconds=0.2)
    assert info.value.kind == "Limit" and not (tmp_path / "out.onnx").exists()


def test_a_child_over_its_memory_is_stopped(model, tmp_path):
    with pytest.raises(FuseJobError, match=r"over the 20 MiB allowed") as info:
        _job(model, tmp_path / "out.onnx", max_memory=20 << 20)
    assert info.value.kind == "Limit"


def test_the_childs_own_errors_come_back(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(FuseJobError) as info:
        _job(junk, tmp_path / "out.onnx")
    assert info.value.kind == "ModelFileError" and "ONNX" in str(info.value)


def test_auto_memory_limit():
    assert auto_memory_limit(0) <= 2 * GiB
    assert auto_memory_limit(100 << 20) in (2 * GiB + 600 * (1 << 20), auto_memory_limit(10**15))
    assert auto_memory_limit(10**15) < 10**15  # never more than the machine has
