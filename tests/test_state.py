"""Node state in SQLite survives reopening; holds are reference-counted per owner."""

from __future__ import annotations

from node.state import State


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
