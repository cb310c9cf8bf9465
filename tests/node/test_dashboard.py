"""Seeing what a node does, on a real 4-node network (127.0.0.1): ``fusenode ls`` and
``fusenode status`` (no CID) through the CLI, ``GET /metrics`` parsed by prometheus_client's
own parser, and the dashboard in a real browser (Debian's chromium, headless, driven by
selenium): the token is entered once, the model's grid of segments x fragments shows which
holder answered, and after a holder is killed a degraded segment appears. The screenshot is
kept as a test artifact (artifacts/dashboard.png, printed).

The browser is required under CI=true (CI installs it: scripts/dev test does, as root);
elsewhere, without it, the browser test skips saying why.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from fusenode import defaults
from tests.support.cli import assert_ok, scrape

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts"
CONFIG = {
    ("storage", "segment_size"): str(256 << 10),  # three segments from the model below
    ("storage", "fetch_timeout"): "10.0",
    # No repair or audit during the test: the killed holder's fragments must stay missing.
    ("repair", "interval"): "3600.0",
    ("repair", "audit_interval"): "3600.0",
}
#: A model name a hostile user could choose: the page must show it as text.
HOSTILE_NAME = "<img src=x onerror=document.title='pwned'>.onnx"


def wait_for(check, timeout: float, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(every)


def cli_json(net, i: int, *args: str):
    return json.loads(assert_ok(net.cli(i, *args, "--json")).stdout)


@pytest.fixture(scope="module")
def net(network):
    return network(4, CONFIG)


@pytest.fixture(scope="module")
def stored(net, tmp_path_factory):
    """A 3-segment model (k=2, n=4: one fragment on each node) and a small one whose name is
    markup, both put by node 0."""
    data = tmp_path_factory.mktemp("data")
    src = data / "resnet-demo.onnx"
    src.write_bytes(os.urandom(700_000))
    cid = assert_ok(net.cli(0, "put", str(src), "-k", "2", "-n", "4")).stdout.split()[-1]
    hostile = data / HOSTILE_NAME
    hostile.write_bytes(os.urandom(10_000))
    other = assert_ok(net.cli(0, "put", str(hostile), "-k", "2", "-n", "4")).stdout.split()[-1]
    return cid, other


def test_ls_status_and_metrics_after_a_put(net, stored):
    cid, other = stored
    models = {m["cid"]: m for m in cli_json(net, 0, "ls")["models"]}
    assert models[cid]["name"] == "resnet-demo.onnx" and models[cid]["size"] == 700_000
    assert (models[cid]["k"], models[cid]["n"], models[cid]["segments"]) == (2, 4, 3)
    assert models[other]["name"] == HOSTILE_NAME
    owner = net.nodes[0].peer_id

    # Every other node holds one fragment of each segment (and the manifests) for node 0.
    held = cli_json(net, 1, "ls")["held"]
    [mine] = [h for h in held if h["peer"] == owner]
    assert mine["fragments"] >= 3 + 1 + 2 and mine["bytes"] > 700_000 // 2
    assert cli_json(net, 1, "ls")["models"] == []

    def summary():
        st = cli_json(net, 0, "status")
        return st if st["peers"]["live"] == 3 else None

    st = wait_for(summary, 60)
    assert st, "node 0 never saw its 3 peers live"
    assert st["daemon"] and st["peer_id"] == owner and st["uptime_seconds"] > 0
    assert st["models"]["placed"] == 2 and st["models"]["healthy"] == 2
    assert st["activity"]["put"]["runs"] == 2 and st["activity"]["put"]["errors"] == 0
    assert st["storage"]["blockstore_bytes"] > 0

    ours = scrape(net, 0)
    assert ours[("fusenode_operation_seconds_count", (("operation", "put"),))] == 2
    assert ours[("fusenode_operation_errors_total", (("operation", "put"),))] == 0
    assert ours[("fusenode_models", (("health", "healthy"),))] == 2
    assert ours[("fusenode_degraded_segments", ())] == 0
    assert ours[("fusenode_peers", (("state", "live"),))] == 3
    assert ours[("fusenode_kubo_restarts_total", ())] == 0
    assert ours[("fusenode_blockstore_bytes", ())] >= ours[("fusenode_pinned_bytes", ())] > 0

    theirs = scrape(net, 1)
    labels = (("peer", owner),)
    assert theirs[("fusenode_held_fragments", labels)] == mine["fragments"]
    assert theirs[("fusenode_held_bytes", labels)] == mine["bytes"]
    st1 = cli_json(net, 1, "status")
    assert st1["storage"]["held_bytes"] == mine["bytes"]
    # Holds are accounted at least MIN_HOLD_BYTES each (a manifest is smaller than that).
    floor = mine["bytes"] - mine["fragments"] * defaults.MIN_HOLD_BYTES
    assert theirs[("fusenode_blockstore_bytes", ())] >= floor > 0


# -- the dashboard in a real browser ----------------------------------------------------------


def browser():
    """A headless chromium driven through chromedriver; fails under CI=true when missing."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        why = "chromium and chromedriver are needed (apt-get install chromium chromium-driver)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"the dashboard's browser test is required under CI: {why}")
        pytest.skip(why)
    # Network rule: nothing but 127.0.0.1. Selenium Manager (which would look up drivers and
    # send usage statistics) stays off: the driver is named and offline mode is set; chromium's
    # background services (updates, metrics, sync, safe browsing...) are off, and every host
    # name but 127.0.0.1 fails to resolve. (Checked with strace -e connect,sendto: every TCP
    # connection goes to 127.0.0.1 or ::1; chromedriver's network stack also connects a UDP
    # socket to 2001:4860:4860::8888, Chromium's IPv6 reachability probe, which only asks the
    # kernel for a route and sends no packet.)
    os.environ["SE_OFFLINE"] = "true"
    os.environ["SE_AVOID_STATS"] = "true"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--window-size=1400,1300",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        "--disable-domain-reliability",
        "--disable-client-side-phishing-detection",
        "--disable-features=OptimizationHints,MediaRouter,Translate",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    ):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))


def test_dashboard_shows_the_grid_and_a_degraded_segment(net, stored):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as seen
    from selenium.webdriver.support.ui import WebDriverWait

    cid, other = stored
    token = (net.nodes[0].repo / "api.token").read_text().strip()
    killed = net.nodes[3].peer_id
    driver = browser()
    try:
        wait = WebDriverWait(driver, 60, poll_frequency=0.3)
        driver.get(net.nodes[0].api_url + "/")
        # No token yet: the page asks for it, and keeps it.
        field = wait.until(seen.visibility_of_element_located((By.ID, "token")))
        field.send_keys(token)
        driver.find_element(By.CSS_SELECTOR, "#login-form button").click()
        model = f'.model[data-cid="{cid}"]'
        wait.until(seen.presence_of_element_located((By.CSS_SELECTOR, model + " .grid")))
        cells = driver.find_elements(By.CSS_SELECTOR, model + " .frag")
        assert len(cells) == 3 * 4  # segments x fragments
        assert {c.get_attribute("data-state") for c in cells} == {"ok"}
        holders = {c.get_attribute("data-peer") for c in cells}
        assert holders == {n.peer_id for n in net.nodes}  # one fragment per node per segment
        node_text = driver.find_element(By.ID, "node").text
        assert net.nodes[0].peer_id in node_text
        assert "resnet-demo.onnx" in driver.find_element(By.CSS_SELECTOR, model).text

        # The name that is markup is shown as text: no element was made of it.
        hostile = driver.find_element(By.CSS_SELECTOR, f'.model[data-cid="{other}"] strong')
        assert hostile.text == HOSTILE_NAME
        assert not driver.find_elements(By.CSS_SELECTOR, "#models img")
        assert driver.title == "fusenode"

        # The token survives a reload (kept in the browser's storage).
        driver.refresh()
        wait.until(seen.presence_of_element_located((By.CSS_SELECTOR, model + " .grid")))
        assert not driver.find_element(By.ID, "login").is_displayed()

        net.kill(3)  # SIGKILL a holder: its fragment of every segment stops answering
        degraded = model + " .segment.degraded"
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, degraded)) == 3)
        silent = driver.find_elements(By.CSS_SELECTOR, model + ' .frag[data-state="silent"]')
        assert {c.get_attribute("data-peer") for c in silent} == {killed}
        assert len(silent) == 3
        health = driver.find_element(By.CSS_SELECTOR, model).get_attribute("data-health")
        assert health == "degraded"
        assert "2 not healthy" in driver.find_element(By.ID, "models-summary").text

        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "dashboard.png"
        assert driver.save_screenshot(str(shot))
        print(f"\ndashboard screenshot: {shot}")
        assert shot.stat().st_size > 10_000
    finally:
        driver.quit()


# -- without a daemon ------------------------------------------------------------------------


def test_ls_and_status_without_a_daemon(cli, tmp_path):
    """The same commands on a repo no daemon serves: read from its state and disk; health
    counts what the state records (no liveness checks run), and it says it is offline."""
    repo = tmp_path / "repo"
    assert_ok(cli("init", "--repo", repo))
    src = tmp_path / "small.onnx"
    src.write_bytes(os.urandom(50_000))
    cid = assert_ok(cli("put", src, "--repo", repo, "-k", "2", "-n", "3")).stdout.split()[-1]
    listing = json.loads(assert_ok(cli("ls", "--repo", repo, "--json")).stdout)
    [m] = listing["models"]
    assert (m["cid"], m["name"], m["size"], m["health"]) == (cid, "small.onnx", 50_000, "healthy")
    assert m["placement"] == "local" and listing["held"] == []
    st = json.loads(assert_ok(cli("status", "--repo", repo, "--json")).stdout)
    assert st["daemon"] is False and st["uptime_seconds"] is None
    assert st["models"]["placed"] == 1 and st["models"]["healthy"] == 1
    # Everything is here: the blockstore holds at least the fragments pinned.
    assert st["storage"]["blockstore_bytes"] >= st["storage"]["pinned_bytes"] > 50_000
    human = assert_ok(cli("status", "--repo", repo))
    assert "not running" in human.stdout and "1 placed: 1 healthy" in human.stdout
    text = assert_ok(cli("ls", "--repo", repo)).stdout
    assert cid in text and "small.onnx" in text and "healthy" in text
