"""The `fusenode` package itself: its public API, its error model, how it is packaged."""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import onnx
import pytest

import fusenode
from fusenode.errors import Error
from tests.support.onnx_models import conv_bn

ROOT = Path(__file__).resolve().parents[1]


def test_public_api_is_explicit():
    assert fusenode.__all__ == sorted(fusenode.__all__)
    assert set(fusenode.__all__) == {"Error", "__version__", "connect", "fetch", "fuse", "store"}
    for name in fusenode.__all__:
        assert hasattr(fusenode, name), name


def test_importing_the_package_loads_nothing_heavy():
    code = (
        "import sys, fusenode; "
        "heavy = [m for m in ('numpy', 'onnx', 'onnxruntime', 'torch', 'aiohttp', 'ml_dtypes')"
        " if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _table() -> dict[str, tuple[int, int]]:
    """The hierarchy drawn in fusenode/errors.py's docstring: name -> (exit, status)."""
    doc = importlib.import_module("fusenode.errors").__doc__ or ""
    rows = re.findall(r"(\w+)\s+(\d+) / (\d{3})", doc)
    return {name: (int(code), int(status)) for name, code, status in rows}


def test_the_drawn_error_table_is_what_the_classes_say():
    for module in ("storage.errors", "passes.errors", "node.errors", "node.protocol"):
        importlib.import_module(f"fusenode.{module}")
    importlib.import_module("fusenode.node.peerauth")
    importlib.import_module("fusenode.node.optimizer")
    importlib.import_module("fusenode.node.provenance")
    importlib.import_module("fusenode.node.gc")
    table = _table()
    assert len(table) >= 25
    for name, (code, status) in table.items():
        cls = Error if name == "Error" else Error.named(name)
        assert cls is not None, f"{name} is drawn but not defined"
        assert (cls.exit_code, cls.http_status) == (code, status), name
    # And every error class of the product is drawn.
    defined = {c.__name__ for c in _subclasses(Error) if c.__module__.startswith("fusenode.")}
    assert defined <= set(table), defined - set(table)


def _subclasses(cls: type) -> set[type]:
    out = set()
    for sub in cls.__subclasses__():
        out |= {sub, *_subclasses(sub)}
    return out


def test_every_package_folder_is_packaged_under_fusenode():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setuptools = project["tool"]["setuptools"]
    packages = set(setuptools["packages"])
    mapping = setuptools["package-dir"]
    assert all(p == "fusenode" or p.startswith("fusenode.") for p in packages)
    found = set()
    for top in ("node", "storage", "passes", "fusenode"):
        prefix = "fusenode" if top == "fusenode" else f"fusenode.{top}"
        assert mapping[prefix] == top
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top).parts
            found.add(".".join((prefix, *rel)))
    assert found == packages, found ^ packages
    assert project["project"]["license"] == "Apache-2.0"  # an SPDX expression


@pytest.mark.slow
def test_store_fetch_and_fuse_from_python(tmp_path, monkeypatch):
    from fusenode.node.repo import Repo

    repo = tmp_path / "repo"
    Repo.init(repo)
    src = tmp_path / "weights.bin"
    src.write_bytes(os.urandom(200_000))
    monkeypatch.chdir(tmp_path)  # relative paths are the caller's
    cid = fusenode.store("weights.bin", repo=repo, k=2, n=3)
    got = fusenode.fetch(cid, "copy.bin", repo=repo)
    assert got["path"] == str(tmp_path / "copy.bin")
    assert got["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert (tmp_path / "copy.bin").read_bytes() == src.read_bytes()
    with pytest.raises(fusenode.Error) as info:  # a CID nobody has: found nowhere
        fusenode.fetch("QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG", "x", repo=repo)
    assert info.value.exit_code == 4
    model, _ = conv_bn()
    onnx.save(model, tmp_path / "m.onnx")
    report = fusenode.fuse(tmp_path / "m.onnx", tmp_path / "f.onnx", verify=True)
    assert report["n_fused"] == 1 and report["verify"]["ok"]
