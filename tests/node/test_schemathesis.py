"""The local API against its own openapi.json, driven by schemathesis on a real daemon.

Every check schemathesis has (``--checks all``): no server error, every status and content
type documented, responses matching their schemas, schema-invalid requests refused with a
4xx, schema-valid ones never refused as malformed, the token enforced where it is needed,
unsupported methods answered 405 with an Allow header. Run as a user would run it: the
``st`` command line against the daemon's served document, with no help from this suite (no
custom formats, no relaxed expectations), so an independent run sees what this one sees.

Bounded: a few examples per operation (``--max-examples``) on one daemon alone on 127.0.0.1
with a short fetch deadline; a CID nobody holds is answered at once (the embedded node knows
nothing is connected to ask), so the run takes about a minute.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from tests.support.cli import clean_env

pytestmark = pytest.mark.slow


def test_schemathesis_all_checks_pass(network, tmp_path):
    import subprocess

    net = network(1, {("storage", "fetch_timeout"): "2.0"})
    node = net.nodes[0]
    token = (node.repo / "api.token").read_text().strip()
    st = shutil.which("st", path=str(Path(sys.executable).parent))
    assert st is not None, "schemathesis (dev dependency) is not installed"
    proc = subprocess.run(
        [
            st,
            "run",
            f"{node.api_url}/api/v1/openapi.json",
            "--url",
            node.api_url,
            "--checks",
            "all",
            "--header",
            f"Authorization: Bearer {token}",
            "--max-examples",
            "50",
            "--workers",
            "1",
            "--request-timeout",
            "30",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
        env=clean_env(SCHEMATHESIS_HOOKS="", HOME=str(tmp_path)),
    )
    report = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, report
    assert "No issues found" in proc.stdout or "passed" in proc.stdout, report
    # The daemon is still serving after every generated request.
    assert net.cli(0, "id", "--json").returncode == 0
