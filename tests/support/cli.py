"""Running the ``fusenode`` command line in tests, as a user would (the `cli` fixture)."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without FUSENODE_* variables (a test says what it sets)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUSENODE_")}
    env.update(extra)
    return env


class Cli:
    """Runs ``fusenode ARGS...`` in a new process, as a user would."""

    def __call__(
        self,
        *args: object,
        timeout: float = 300,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "fusenode.node.cli", *map(str, args)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd,
            env=env if env is not None else clean_env(),
        )

    def ok(self, *args: object, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """Run; assert it exited 0."""
        proc = self(*args, **kwargs)
        assert proc.returncode == 0, proc.stderr
        return proc

    def fails(
        self, *args: object, text: str | None = None, code: int | None = None, **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run; assert it failed cleanly: non-zero (``code`` if given), one line on stderr
        starting ``fusenode: error:`` (containing ``text`` if given), no traceback."""
        proc = self(*args, **kwargs)
        return assert_clean_error(proc, text, code)


def assert_clean_error(
    proc: subprocess.CompletedProcess[str], text: str | None = None, code: int | None = None
) -> subprocess.CompletedProcess[str]:
    assert proc.returncode != 0, proc.stdout
    if code is not None:
        assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("fusenode: error:"), proc.stderr
    if text:
        assert text in proc.stderr, proc.stderr
    return proc


def assert_ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, proc.stderr
    return proc


def scrape(net: Any, i: int) -> dict[tuple[str, tuple], float]:
    """GET node i's /metrics without the token, parsed by prometheus_client's own parser:
    (sample name, sorted labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(net.nodes[i].api_url + "/metrics", timeout=30) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
