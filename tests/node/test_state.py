"""Node state in SQLite survives reopening; holds are reference-counted per owner."""

from __future__ import annotations

from fusenode.node.state import State


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
