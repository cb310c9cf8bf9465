"""Node state in SQLite survives reopening; holds are reference-counted per owner."""

from __future__ import annotations

import pytest

from fusenode.node.state import SCHEMA_VERSION, State


def test_models_and_placements_survive_reopen(tmp_path):
    db = tmp_path / "state.db"
    s = State(db)
    s.record_model("QmM", 4, 6, 2, "distinct", [(0, i, f"Qm{i}", f"peer{i}") for i in range(6)])
    s.move_placement("QmM", 0, 3, "peerX")
    s.close()
    s = State(db)
    assert s.model("QmM") == ("QmM", 4, 6, 2, "distinct")
    rows = s.placements("QmM")
    assert [r.peer for r in rows] == ["peer0", "peer1", "peer2", "peerX", "peer4", "peer5"]
    s.close()


def test_holds_are_counted_per_owner(tmp_path):
    s = State(tmp_path / "s.db")
    s.hold(["QmA", "QmB"], "alice")
    s.hold(["QmA"], "bob")
    assert s.held(["QmA", "QmB", "QmC"]) == {"QmA", "QmB"}
    assert s.release("QmA", "alice") is False  # bob still holds it
    assert s.release("QmA", "bob") is True
    assert s.held() == {"QmB"}
    s.close()


def test_peer_liveness(tmp_path):
    s = State(tmp_path / "s.db")
    s.peer_failed("p", "down")
    rec = s.peer("p")
    assert rec.last_seen is None and rec.last_error == "down"
    s.peer_answered("p")
    rec = s.peer("p")
    assert rec.last_seen is not None and rec.last_error is None
    s.close()


def test_jobs_are_unique_persistent_and_requeued(tmp_path):
    db = tmp_path / "s.db"
    s = State(db)
    job, created = s.submit_job("optimize", "QmSrc", "fuse", "1", ["age1b", "age1a"], "user")
    assert created and job["state"] == "queued" and job["recipients"] == ["age1a", "age1b"]
    again, created = s.submit_job("optimize", "QmSrc", "fuse", "1", ["age1a", "age1b"], "user")
    assert not created and again["id"] == job["id"]  # same source and pass: same job
    claimed = s.next_queued_job()
    assert claimed["id"] == job["id"] and claimed["state"] == "running"
    s.close()
    s = State(db)  # the daemon died mid-job
    assert s.requeue_interrupted_jobs() == 1
    claimed = s.next_queued_job()
    s.fail_job(claimed["id"], "not an ONNX model")
    failed = s.job(claimed["id"])
    assert failed["state"] == "failed" and failed["error"] == "not an ONNX model"
    retried, created = s.submit_job("optimize", "QmSrc", "fuse", "1", ["age1a", "age1b"], "user")
    assert created and retried["state"] == "queued"
    s.finish_job(s.next_queued_job()["id"], "QmOut", {"n_fused": 3})
    done = s.job(job["id"])
    assert done["state"] == "done" and done["result"] == "QmOut" and done["seconds"] >= 0
    assert done["attempts"] == 3
    s.close()


def test_a_version_1_database_is_brought_forward(tmp_path):
    """Repos made before audits and quotas: their held and placements tables gain the new
    columns, the new tables appear, and nothing already recorded is lost."""
    import sqlite3

    db = tmp_path / "old.db"
    with sqlite3.connect(db) as conn:
        conn.executescript(
            """
            CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            INSERT INTO meta VALUES ('schema_version', '1');
            CREATE TABLE placements (manifest TEXT NOT NULL, segment INTEGER NOT NULL,
                fragment INTEGER NOT NULL, cid TEXT NOT NULL, peer TEXT NOT NULL,
                confirmed TEXT NOT NULL, PRIMARY KEY (manifest, segment, fragment));
            INSERT INTO placements VALUES ('QmM', 0, 0, 'QmF', 'peer', '2025-01-01T00:00:00.0Z');
            CREATE TABLE held (cid TEXT NOT NULL, owner TEXT NOT NULL, pinned TEXT NOT NULL,
                PRIMARY KEY (cid, owner));
            INSERT INTO held VALUES ('QmF', 'alice', '2025-01-01T00:00:00.0Z');
            """
        )
    s = State(db)
    [row] = s.placements("QmM")
    assert (row.cid, row.peer, row.receipt, row.lost) == ("QmF", "peer", None, None)
    assert s.held(["QmF"]) == {"QmF"} and s.held_bytes("alice") == 0
    s.hold(["QmG"], "alice", 5000)
    assert s.held_bytes("alice") == 5000
    assert s.mark_lost("QmF", "peer", "failed audit") == 1
    assert s.placements("QmM")[0].lost == "failed audit"
    assert s.record_audit("QmF", "peer", "passed") == 0
    s.close()
    with sqlite3.connect(db) as conn:
        version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    assert version == (str(SCHEMA_VERSION),)


def test_audit_scores_follow_storjs_beta_reputation(tmp_path):
    s = State(tmp_path / "s.db")
    assert s.update_score("p", True, 0.95) == 1.0
    after_failure = s.update_score("p", False, 0.95)
    # alpha: 1 -> 0.95 + 1 = 1.95 -> 0.95 * 1.95 = 1.8525; beta: 0 -> 0 -> 1
    assert after_failure == pytest.approx(1.8525 / 2.8525)
    assert after_failure < 0.8
    for _ in range(30):
        score = s.update_score("p", True, 0.95)
    assert score > 0.8  # passing audits bring a holder back
    assert s.scores()["p"]["passed"] == 31 and s.scores()["p"]["failed"] == 1
    assert s.record_audit("QmF", "p", "unanswered") == 1
    assert s.record_audit("QmF", "p", "unanswered") == 2
    assert s.record_audit("QmF", "p", "passed") == 0
    s.close()


def test_an_announced_job_that_failed_is_not_queued_again(tmp_path):
    s = State(tmp_path / "s.db")
    s.submit_job("optimize", "QmSrc", "fuse", "1", [], "announce")
    claimed = s.next_queued_job()
    s.fail_job(claimed["id"], "bad model")
    again, changed = s.submit_job(
        "optimize", "QmSrc", "fuse", "1", [], "announce", retry_failed=False
    )
    assert not changed and again["state"] == "failed"
    retried, changed = s.submit_job("optimize", "QmSrc", "fuse", "1", [], "user")
    assert changed and retried["state"] == "queued"  # a user may always retry
    s.close()


def test_a_version_2_database_is_brought_forward(tmp_path):
    """A repo of schema version 2 (before leases and gc): its holds get a lease renewed at
    the migration (an upgrade expires nothing), gc_runs appears, nothing recorded is lost."""
    import sqlite3

    db = tmp_path / "v2.db"
    with sqlite3.connect(db) as conn:
        conn.executescript(
            """
            CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            INSERT INTO meta VALUES ('schema_version', '2');
            CREATE TABLE models (cid TEXT PRIMARY KEY, k INTEGER NOT NULL, n INTEGER NOT NULL,
                segments INTEGER NOT NULL, placement TEXT NOT NULL, created TEXT NOT NULL);
            INSERT INTO models VALUES ('QmM', 2, 3, 1, 'distinct', '2025-01-01T00:00:00.0Z');
            CREATE TABLE placements (manifest TEXT NOT NULL, segment INTEGER NOT NULL,
                fragment INTEGER NOT NULL, cid TEXT NOT NULL, peer TEXT NOT NULL,
                confirmed TEXT NOT NULL, receipt TEXT, lost TEXT,
                PRIMARY KEY (manifest, segment, fragment));
            INSERT INTO placements VALUES ('QmM', 0, 0, 'QmF', 'bob', '2025-01-01T00:00:00.0Z',
                '{"r": 1}', NULL);
            CREATE TABLE held (cid TEXT NOT NULL, owner TEXT NOT NULL, pinned TEXT NOT NULL,
                size INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (cid, owner));
            INSERT INTO held VALUES ('QmOld', 'alice', '2025-01-01T00:00:00.000000Z', 7000);
            INSERT INTO held VALUES ('QmM', 'me', '2025-01-01T00:00:00.000000Z', 4096);
            CREATE TABLE surplus (cid TEXT NOT NULL, peer TEXT NOT NULL, manifest TEXT NOT NULL,
                created TEXT NOT NULL, PRIMARY KEY (cid, peer));
            """
        )
    s = State(db)
    assert s.schema_version() == SCHEMA_VERSION == 3
    assert s.held_bytes("alice") == 7000 and s.placements("QmM")[0].receipt == '{"r": 1}'
    # Pinned in 2025, but the lease starts at the upgrade: nothing expires at once.
    assert s.expired(3600, besides="me") == []
    assert s.renew("alice", ["QmOld", "QmNone"]) == {"QmOld"}
    s._run("UPDATE held SET renewed = '2000-01-01T00:00:00.000000Z'")
    assert s.expired(3600, besides="me") == [("QmOld", "alice")]  # never this node's own
    assert s.gc_runs() == [] and s.last_gc() is None and s.gc_total() == 0
    s.record_gc("cli", {"started": "t", "removed_blocks": 3})
    assert s.last_gc() == {"started": "t", "removed_blocks": 3, "trigger": "cli"}
    s.record_model_info("QmM", {"name": "m.onnx", "size": 10})
    s.record_model_info("QmOther", {"name": "o.onnx", "size": 20})
    s.forget_model("QmM")
    assert s.model("QmM") is None and s.placements("QmM") == []
    assert s.model_info() == {"QmOther": {"name": "o.onnx", "size": 20}}  # its name went too
    assert s.owners(["QmOld", "QmM", "QmX"]) == {"QmOld": {"alice"}, "QmM": {"me"}}
    s.close()


def test_gc_runs_are_bounded_and_counted(tmp_path):
    from fusenode.node.state import GC_RUNS_KEPT

    s = State(tmp_path / "s.db")
    for i in range(GC_RUNS_KEPT + 5):
        s.record_gc("interval", {"n": i})
    runs = s.gc_runs()
    assert len(runs) == GC_RUNS_KEPT and runs[0]["n"] == GC_RUNS_KEPT + 4
    assert s.gc_total() == GC_RUNS_KEPT + 5
    s.close()
