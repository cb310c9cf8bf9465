"""What a node says about itself (node/observe.py, node/metrics.py and the ls, node_status and
metrics use cases of node/service.py) on in-memory fakes, and the routes that serve it
(node/api.py: /metrics and the dashboard's files, open; /api/v1/ls and /status, not)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from fusenode.errors import Error
from fusenode.node.api import PAGES, create_app
from fusenode.node.metrics import Metrics
from fusenode.node.repo import Repo
from tests.node.test_api import AUTH, MAX_BODY, TOKEN, FakeService
from tests.node.test_service import SELF, FakeNetwork, model, run
from tests.node.test_service import repo as repo  # the fixture

PEERS = ["p1", "p2", "p3", "p4", "p5"]


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, parsed by prometheus_client's own parser."""
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def fakes(backend: Any, ctx: Any) -> FakeNetwork:
    network = FakeNetwork(backend, PEERS)
    network.state = ctx.state
    return network


def test_ls_lists_what_put_recorded_and_the_health_it_sees(repo: Repo) -> None:
    src = model(repo, 10_000)

    async def scenario(service, network, state):
        reply = await service.put(str(src), None, None, [], False)
        cid = reply["cid"]
        listing = await service.ls()
        [m] = listing["models"]
        assert (m["cid"], m["name"], m["size"]) == (cid, "model.onnx", 10_000)
        assert (m["k"], m["n"], m["segments"], m["health"]) == (4, 6, 3, "healthy")
        assert m["degraded_segments"] == 0 and m["fragments_counted"] == 18
        assert m["holders"] == sorted([SELF, *PEERS])
        assert listing["held"] == []

        # A copy an audit failed no longer counts: one segment is degraded.
        row = next(p for p in state.placements(cid) if p.peer == "p1" and p.segment == 1)
        state.mark_lost(row.cid, "p1", "audit failed")
        [m] = (await service.ls())["models"]
        assert (m["health"], m["degraded_segments"], m["fragments_counted"]) == ("degraded", 1, 17)

        # A holder whose daemon has not answered for longer than the live window: every
        # segment is short of a copy, segment 1 of two (4 = k left); one more leaves it less.
        old = "2020-01-01T00:00:00.000000Z"
        state._run("UPDATE peers SET last_seen = ? WHERE peer_id = 'p2'", [old])
        [m] = (await service.ls())["models"]
        assert (m["health"], m["degraded_segments"], m["fragments_counted"]) == ("degraded", 3, 14)
        state._run("UPDATE peers SET last_seen = ? WHERE peer_id = 'p3'", [old])
        [m] = (await service.ls())["models"]
        assert m["health"] == "unavailable"

    run(repo, fakes, scenario)


def test_held_for_others_per_peer(repo: Repo) -> None:
    async def scenario(service, network, state):
        state.hold(["QmA", "QmB"], "owner1", 5000)
        state.hold(["QmC"], "owner2", 7000)
        state.hold(["QmD"], SELF)  # this node's own pins are not "for others"
        listing = await service.ls()
        assert listing["models"] == []
        assert listing["held"] == [
            {"peer": "owner1", "fragments": 2, "bytes": 10_000},
            {"peer": "owner2", "fragments": 1, "bytes": 7000},
        ]

    run(repo, fakes, scenario)


def test_node_status_sums_it_up(repo: Repo) -> None:
    src = model(repo, 10_000)

    async def scenario(service, network, state):
        reply = await service.put(str(src), None, None, [], False)
        state.hold(["QmA"], "owner1", 5000)
        state.submit_job("optimize", reply["cid"], "bn", "1", [], "user")
        st = await service.node_status()
        assert st["peer_id"] == SELF and st["daemon"] is True
        assert st["recipient"].startswith("age1")
        assert st["uptime_seconds"] >= 0
        assert st["peers"]["known"] == 5 and st["peers"]["live"] == 5
        assert {p["peer_id"] for p in st["peers"]["list"]} == set(PEERS)
        storage = st["storage"]
        assert storage["capacity"] == "auto"
        assert storage["held_bytes"] == 5000 and storage["held_fragments"] == 1
        # Blockstore and pinned bytes are gc's own count: every block, and what the holds
        # reach (the fake backend counts its stored blobs).
        usage = service.blocks.sync.disk_usage(state.held())
        assert storage["pinned_bytes"] == usage.pinned > 0
        assert storage["blockstore_bytes"] == usage.blockstore >= usage.pinned
        assert storage["capacity_bytes"] >= storage["held_bytes"]
        assert 0 < storage["disk_free_bytes"] <= storage["disk_total_bytes"]
        assert st["models"] == {
            "placed": 1,
            "healthy": 1,
            "degraded": 0,
            "unavailable": 0,
            "degraded_segments": 0,
        }
        assert st["jobs"] == {"queued": 1, "running": 0, "done": 0, "failed": 0}
        assert st["activity"]["put"] == {"runs": 1, "errors": 0}
        assert st["activity"]["gc"] == {"runs": 0, "errors": 0, "last": None}

    run(repo, fakes, scenario)


def test_metrics_read_the_same_numbers(repo: Repo) -> None:
    src = model(repo, 10_000)

    async def scenario(service, network, state):
        await service.put(str(src), None, None, [], False)
        with pytest.raises(Error):  # no such file
            await service.put(str(repo.path / "missing"), None, None, [], False)
        state.hold(["QmA", "QmB"], "owner1", 5000)
        service.metrics.record_gc(1.5, 12345, removed=7)
        got = samples(await service.metrics_text())
        assert got[("fusenode_operation_seconds_count", (("operation", "put"),))] == 2
        assert got[("fusenode_operation_errors_total", (("operation", "put"),))] == 1
        assert got[("fusenode_operation_seconds_count", (("operation", "gc"),))] == 1
        assert got[("fusenode_gc_freed_bytes_total", ())] == 12345
        assert got[("fusenode_held_fragments", (("peer", "owner1"),))] == 2
        assert got[("fusenode_held_bytes", (("peer", "owner1"),))] == 10_000
        assert got[("fusenode_models", (("health", "healthy"),))] == 1
        assert got[("fusenode_degraded_segments", ())] == 0
        assert got[("fusenode_peers", (("state", "live"),))] == 5
        assert got[("fusenode_jobs", (("state", "queued"),))] == 0
        st = await service.node_status()
        assert got[("fusenode_pinned_bytes", ())] == st["storage"]["pinned_bytes"]
        assert st["activity"]["gc"]["last"]["summary"] == {"freed_bytes": 12345, "removed": 7}
        # A peer no longer held for disappears from the per-peer series.
        state.release("QmA", "owner1")
        state.release("QmB", "owner1")
        got = samples(await service.metrics_text())
        assert ("fusenode_held_bytes", (("peer", "owner1"),)) not in got

    run(repo, fakes, scenario)


def test_each_node_has_its_own_registry() -> None:
    a, b = Metrics(), Metrics()
    with a.timed("get"):
        pass
    assert a.runs("get") == (1, 0) and b.runs("get") == (0, 0)


def test_instrumented_passes_keep_their_last_outcome() -> None:
    metrics = Metrics()

    async def good() -> dict[str, Any]:
        return {"repaired": [{"manifest": "m"}, {"manifest": "m"}], "failed": []}

    async def bad() -> dict[str, Any]:
        raise RuntimeError("the disk is gone")

    asyncio.run(metrics.instrument("repair", good)())
    assert metrics.last["repair"]["summary"]["repaired"]
    with pytest.raises(RuntimeError):
        asyncio.run(metrics.instrument("repair", bad)())
    assert metrics.runs("repair") == (2, 1)
    assert metrics.last["repair"]["error"] == "RuntimeError: the disk is gone"
    got = samples(metrics.exposition())
    assert got[("fusenode_repaired_fragments_total", ())] == 2


# -- routes ------------------------------------------------------------------------------------


class ObservedService(FakeService):
    async def metrics_text(self) -> bytes:
        await self._record("metrics")
        metrics = Metrics()
        with metrics.timed("put"):
            pass
        return metrics.exposition()


@pytest.fixture
def observed() -> ObservedService:
    return ObservedService()


@pytest_asyncio.fixture
async def bare(aiohttp_client: Any, observed: ObservedService) -> Any:
    return await aiohttp_client(create_app(observed, token=TOKEN, max_body_bytes=MAX_BODY))


@pytest.mark.asyncio
async def test_metrics_need_no_token(bare: Any) -> None:
    r = await bare.get("/metrics")
    assert r.status == 200
    assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    got = samples(await r.read())
    assert got[("fusenode_operation_seconds_count", (("operation", "put"),))] == 1


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "headers", [{"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"}]
)
async def test_metrics_and_pages_refuse_cross_site_requests(
    bare: Any, observed: ObservedService, headers: dict[str, str]
) -> None:
    for path in ["/metrics", *PAGES]:
        assert (await bare.get(path, headers=headers)).status == 403, path
    r = await bare.get("/metrics", headers={"Host": "evil.example"})
    assert r.status == 421  # DNS rebinding: a page of another site cannot read the numbers
    assert observed.calls == []


@pytest.mark.asyncio
async def test_dashboard_files_are_served_without_the_token(bare: Any) -> None:
    page = await bare.get("/", headers={"Sec-Fetch-Site": "none"})
    assert page.status == 200 and page.content_type == "text/html"
    html = await page.text()
    assert '<script src="/dashboard/app.js"' in html
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert page.headers["X-Frame-Options"] == "DENY"
    script = await bare.get("/dashboard/app.js", headers={"Sec-Fetch-Site": "same-origin"})
    assert script.status == 200 and script.content_type == "text/javascript"
    text = await script.text()
    assert "innerHTML" not in text and "textContent" in text  # data never becomes markup
    assert (await bare.get("/dashboard/style.css")).content_type == "text/css"
    assert (await bare.get("/dashboard/other.js")).status == 404


@pytest.mark.asyncio
async def test_the_json_the_dashboard_reads_needs_the_token(bare: Any) -> None:
    for path in ("/api/v1/ls", "/api/v1/status"):
        assert (await bare.get(path, headers={"Sec-Fetch-Site": "same-origin"})).status == 401
        r = await bare.get(path, headers={**AUTH, "Sec-Fetch-Site": "same-origin"})
        assert r.status != 401
