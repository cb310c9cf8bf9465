"""Node state in SQLite (REPO/state.db): what a restart must not lose.

Tables:

- ``models``: models this node placed (it is their *owner*: it repairs them).
- ``placements``: for each owned model, which peer holds fragment *i* of segment *s*, and
  when that peer last confirmed it pinned it. Placement is kept here, not in the manifest,
  because repair changes it (docs/format.md).
- ``held``: pins this node keeps for others (or itself): fragment or manifest CIDs, the
  owner who asked, and the bytes accounted to that owner (its quota, the node's capacity).
  A CID stays pinned while any row references it.
- ``peers``: fusenode peers seen (or learned from other peers), when they last answered,
  their last error and addresses: repair decides from ``last_seen`` whether a peer has been
  away longer than the threshold; the daemon redials them after a restart.
- ``audits``: the last audit of each fragment this node placed on a peer (time, result) and
  ``scores``: each holder's audit reputation (`fusenode.node.auditor`).
- ``surplus``: copies of fragments this node placed that repair replaced elsewhere (or that
  ``fusenode rm`` could not release at once); each is released (``/peer/v1/unpin``) once its
  holder answers again.
- ``held.renewed``: when the owner last renewed its lease on a hold (`fusenode.node.leases`);
  a hold for another node not renewed for ``[storage] lease_days`` is released.
- ``gc_runs``: the last garbage collections of the blockstore (`fusenode.node.gc`).

Version 3 added ``held.renewed`` (set to the time of the migration: leases start then, so an
upgrade does not expire every old hold at once) and ``gc_runs``.

One connection, WAL mode, short transactions; callers serialize through the lock, so the
daemon's event loop and worker threads can share it.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

SCHEMA_VERSION = 3
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS models (
    cid TEXT PRIMARY KEY,
    k INTEGER NOT NULL,
    n INTEGER NOT NULL,
    segments INTEGER NOT NULL,
    placement TEXT NOT NULL,           -- distinct | weak | local
    created TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS placements (
    manifest TEXT NOT NULL,
    segment INTEGER NOT NULL,
    fragment INTEGER NOT NULL,
    cid TEXT NOT NULL,
    peer TEXT NOT NULL,
    confirmed TEXT NOT NULL,
    receipt TEXT,                      -- the holder's signed receipt (JSON), if a peer
    lost TEXT,                         -- why this copy no longer counts (a failed audit)
    PRIMARY KEY (manifest, segment, fragment)
);
CREATE INDEX IF NOT EXISTS placements_peer ON placements (peer);
CREATE TABLE IF NOT EXISTS held (
    cid TEXT NOT NULL,
    owner TEXT NOT NULL,
    pinned TEXT NOT NULL,
    size INTEGER NOT NULL DEFAULT 0,   -- bytes accounted to the owner
    renewed TEXT,                      -- the owner's last lease renewal (or the store)
    PRIMARY KEY (cid, owner)
);
CREATE INDEX IF NOT EXISTS held_owner ON held (owner);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,                -- optimize
    source TEXT NOT NULL,              -- manifest CID of the input model
    pass TEXT NOT NULL,
    pass_version TEXT NOT NULL,
    recipients TEXT NOT NULL,          -- JSON list, sorted ([] = the source's recipients)
    state TEXT NOT NULL,               -- queued | running | done | failed
    result TEXT,                       -- manifest CID of the optimized model
    error TEXT,                        -- why it failed (kept until it runs again)
    report TEXT,                       -- JSON: fusion report, verification, timings
    origin TEXT NOT NULL,              -- user | announce
    attempts INTEGER NOT NULL DEFAULT 0,
    created TEXT NOT NULL,
    started TEXT,
    finished TEXT,
    UNIQUE (kind, source, pass, pass_version, recipients)
);
CREATE TABLE IF NOT EXISTS peers (
    peer_id TEXT PRIMARY KEY,
    first_seen TEXT NOT NULL,
    last_seen TEXT,
    last_error TEXT,
    addresses TEXT                     -- JSON list of multiaddrs, to redial after restarts
);
CREATE TABLE IF NOT EXISTS audits (
    cid TEXT NOT NULL,                 -- a fragment this node placed
    peer TEXT NOT NULL,                -- its holder when audited
    time TEXT NOT NULL,
    result TEXT NOT NULL,              -- passed | failed | unanswered
    detail TEXT,
    unanswered INTEGER NOT NULL DEFAULT 0,  -- audits in a row without an answer
    PRIMARY KEY (cid, peer)
);
CREATE TABLE IF NOT EXISTS scores (
    peer TEXT PRIMARY KEY,
    alpha REAL NOT NULL,               -- Storj's beta reputation: forgetting-weighted passes
    beta REAL NOT NULL,                -- and failures
    passed INTEGER NOT NULL,
    failed INTEGER NOT NULL,
    updated TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS surplus (
    cid TEXT NOT NULL,                 -- a fragment this node placed, repaired elsewhere
    peer TEXT NOT NULL,                -- the holder whose copy no longer counts
    manifest TEXT NOT NULL,
    created TEXT NOT NULL,
    PRIMARY KEY (cid, peer)
);
CREATE TABLE IF NOT EXISTS gc_runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    started TEXT NOT NULL,
    trigger TEXT NOT NULL,             -- cli | interval
    report TEXT NOT NULL               -- JSON: fusenode.node.gc.GcReport
);
"""

#: gc runs kept in the state (the oldest are dropped).
GC_RUNS_KEPT = 100


_ISO = "%Y-%m-%dT%H:%M:%S.%fZ"


def now_iso() -> str:
    return datetime.now(UTC).strftime(_ISO)


def parse_iso(text: str | None) -> datetime | None:
    if not text:
        return None
    return datetime.strptime(text, _ISO).replace(tzinfo=UTC)


@dataclass(frozen=True)
class Placement:
    manifest: str
    segment: int
    fragment: int
    cid: str
    peer: str
    confirmed: str
    receipt: str | None = None
    lost: str | None = None


JOB_COLUMNS = (
    "id",
    "kind",
    "source",
    "pass",
    "pass_version",
    "recipients",
    "state",
    "result",
    "error",
    "report",
    "origin",
    "attempts",
    "created",
    "started",
    "finished",
)


def _job_dict(row: tuple) -> dict:
    job = dict(zip(JOB_COLUMNS, row, strict=True))
    job["recipients"] = json.loads(job["recipients"])
    job["report"] = json.loads(job["report"]) if job["report"] else None
    start, end = parse_iso(job["started"]), parse_iso(job["finished"])
    job["seconds"] = round((end - start).total_seconds(), 3) if start and end else None
    return job


@dataclass(frozen=True)
class PeerRecord:
    peer_id: str
    first_seen: str
    last_seen: str | None
    last_error: str | None
    addresses: str | None = None

    def multiaddrs(self) -> list[str]:
        return json.loads(self.addresses) if self.addresses else []


class State:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        with self._lock:
            self._db.executescript(_SCHEMA)
            self._migrate()
            self._db.execute(
                "INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )

    def _migrate(self) -> None:
        """Bring a version 1 or 2 database forward: the columns versions 2 and 3 added (the
        new tables come from the schema's CREATE IF NOT EXISTS). Holds without a lease
        renewal get one now."""
        for table, column, decl in (
            ("held", "size", "INTEGER NOT NULL DEFAULT 0"),
            ("placements", "receipt", "TEXT"),
            ("placements", "lost", "TEXT"),
            ("held", "renewed", "TEXT"),
        ):
            columns = {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}
            if column not in columns:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
        self._db.execute("UPDATE held SET renewed = ? WHERE renewed IS NULL", (now_iso(),))

    def schema_version(self) -> int:
        rows = self._run("SELECT value FROM meta WHERE key = 'schema_version'")
        return int(rows[0][0]) if rows else 0

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _run(self, sql: str, params: Iterable = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, tuple(params)).fetchall()

    def _many(self, sql: str, rows: Iterable[Iterable]) -> None:
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany(sql, [tuple(r) for r in rows])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    # -- owned models and their placements -------------------------------------------------
    def record_model(
        self,
        cid: str,
        k: int,
        n: int,
        segments: int,
        placement: str,
        placements: Iterable[tuple[int, int, str, str]],
        receipts: dict[tuple[int, int], str] | None = None,
    ) -> None:
        """Record a model and where its fragments are (with the holders' signed receipts,
        keyed by (segment, fragment)), in one transaction."""
        receipts = receipts or {}
        stamp = now_iso()
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.execute(
                    "INSERT OR REPLACE INTO models VALUES (?, ?, ?, ?, ?, ?)",
                    (cid, k, n, segments, placement, stamp),
                )
                self._db.executemany(
                    "INSERT OR REPLACE INTO placements VALUES (?, ?, ?, ?, ?, ?, ?, NULL)",
                    [
                        (cid, s, i, frag, peer, stamp, receipts.get((s, i)))
                        for s, i, frag, peer in placements
                    ],
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def model(self, cid: str) -> tuple[str, int, int, int, str] | None:
        rows = self._run("SELECT cid, k, n, segments, placement FROM models WHERE cid = ?", [cid])
        return rows[0] if rows else None

    def models(self) -> list[tuple[str, int, int, int, str, str]]:
        """(cid, k, n, segments, placement, created) of every model this node placed."""
        return self._run(
            "SELECT cid, k, n, segments, placement, created FROM models ORDER BY created, cid"
        )

    _INFO_KEY = "model:"

    def record_model_info(self, cid: str, info: dict) -> None:
        """What put knew of a model and the manifest does not say in clear (its name, size):
        kept in ``meta`` under ``model:<cid>`` (no schema change: the models table has no
        column for it), for ``fusenode ls``."""
        self._run(
            "INSERT OR REPLACE INTO meta VALUES (?, ?)", [self._INFO_KEY + cid, json.dumps(info)]
        )

    _SHARE_KEY = "share:"

    def record_share(self, cid: str, source: str, peers: list[str]) -> None:
        """A manifest this node wrote by ``share`` (new keys for ``source``'s data) and the
        peers it was copied to: ``fusenode rm`` of either asks them to release it. Kept in
        ``meta`` under ``share:<cid>``."""
        info = {"source": source, "peers": sorted(set(peers)), "created": now_iso()}
        self._run(
            "INSERT OR REPLACE INTO meta VALUES (?, ?)", [self._SHARE_KEY + cid, json.dumps(info)]
        )

    def shares(self) -> dict[str, dict]:
        """cid -> {source, peers, created} of every share this node made and still keeps."""
        rows = self._run(
            "SELECT key, value FROM meta WHERE key >= ? AND key < ?",
            [self._SHARE_KEY, self._SHARE_KEY[:-1] + ";"],
        )
        return {key[len(self._SHARE_KEY) :]: json.loads(value) for key, value in rows}

    def forget_share(self, cid: str) -> None:
        self._run("DELETE FROM meta WHERE key = ?", [self._SHARE_KEY + cid])

    def model_info(self) -> dict[str, dict]:
        """cid -> what `record_model_info` kept."""
        rows = self._run(
            "SELECT key, value FROM meta WHERE key >= ? AND key < ?",
            [self._INFO_KEY, self._INFO_KEY[:-1] + ";"],
        )
        return {key[len(self._INFO_KEY) :]: json.loads(value) for key, value in rows}

    def placements(self, manifest: str | None = None) -> list[Placement]:
        if manifest is None:
            rows = self._run("SELECT * FROM placements ORDER BY manifest, segment, fragment")
        else:
            rows = self._run(
                "SELECT * FROM placements WHERE manifest = ? ORDER BY segment, fragment",
                [manifest],
            )
        return [Placement(*r) for r in rows]

    def move_placement(
        self, manifest: str, segment: int, fragment: int, peer: str, receipt: str | None = None
    ) -> None:
        self._run(
            "UPDATE placements SET peer = ?, confirmed = ?, receipt = ?, lost = NULL "
            "WHERE manifest = ? AND segment = ? AND fragment = ?",
            [peer, now_iso(), receipt, manifest, segment, fragment],
        )

    def placed_on(self, cid: str, peer: str) -> bool:
        """Whether a placement still lists fragment ``cid`` on ``peer`` (and counts it)."""
        rows = self._run(
            "SELECT 1 FROM placements WHERE cid = ? AND peer = ? AND lost IS NULL LIMIT 1",
            [cid, peer],
        )
        return bool(rows)

    def mark_lost(self, cid: str, peer: str, why: str) -> int:
        """Every placement of fragment ``cid`` on ``peer`` no longer counts (repair rebuilds
        it elsewhere); how many rows."""
        with self._lock:
            cur = self._db.execute(
                "UPDATE placements SET lost = ? WHERE cid = ? AND peer = ? AND lost IS NULL",
                (why[:500], cid, peer),
            )
            return cur.rowcount

    # -- pins held for owners --------------------------------------------------------------
    def hold(self, cids: Iterable[str], owner: str, size: int = 0) -> None:
        """Record that ``owner`` holds ``cids`` here, each accounted ``size`` bytes."""
        stamp = now_iso()
        self._many(
            "INSERT INTO held VALUES (?, ?, ?, ?, ?) ON CONFLICT(cid, owner) DO UPDATE "
            "SET size = MAX(held.size, excluded.size), renewed = excluded.renewed",
            ((c, owner, stamp, size, stamp) for c in cids),
        )

    def unsized_holds(self, besides: str) -> list[tuple[str, str]]:
        """(cid, owner) of holds for others recorded without a size (schema version 1)."""
        rows = self._run("SELECT cid, owner FROM held WHERE size = 0 AND owner != ?", [besides])
        return [(r[0], r[1]) for r in rows]

    def holds(self, cid: str, owner: str) -> bool:
        return bool(self._run("SELECT 1 FROM held WHERE cid = ? AND owner = ?", [cid, owner]))

    def held_bytes(self, owner: str | None = None, *, besides: str | None = None) -> int:
        """Bytes accounted to ``owner``, or to every owner but ``besides``."""
        if owner is not None:
            rows = self._run("SELECT COALESCE(SUM(size), 0) FROM held WHERE owner = ?", [owner])
        else:
            rows = self._run(
                "SELECT COALESCE(SUM(size), 0) FROM held WHERE owner != ?", [besides or ""]
            )
        return int(rows[0][0])

    def held_per_owner(self, besides: str) -> list[tuple[str, int, int]]:
        """(owner, CIDs held, bytes accounted) for every owner but ``besides``."""
        rows = self._run(
            "SELECT owner, COUNT(*), COALESCE(SUM(size), 0) FROM held WHERE owner != ? "
            "GROUP BY owner ORDER BY owner",
            [besides],
        )
        return [(r[0], int(r[1]), int(r[2])) for r in rows]

    def held(self, cids: Iterable[str] | None = None) -> set[str]:
        if cids is None:
            return {r[0] for r in self._run("SELECT DISTINCT cid FROM held")}
        wanted = list(cids)
        found: set[str] = set()
        for i in range(0, len(wanted), 500):
            chunk = wanted[i : i + 500]
            marks = ",".join("?" * len(chunk))
            found |= {
                r[0] for r in self._run(f"SELECT cid FROM held WHERE cid IN ({marks})", chunk)
            }
        return found

    def owners(self, cids: Iterable[str]) -> dict[str, set[str]]:
        """Who holds each of ``cids`` here (CIDs nobody holds are left out)."""
        out: dict[str, set[str]] = {}
        wanted = list(cids)
        for i in range(0, len(wanted), 500):
            chunk = wanted[i : i + 500]
            marks = ",".join("?" * len(chunk))
            for cid, owner in self._run(
                f"SELECT cid, owner FROM held WHERE cid IN ({marks})", chunk
            ):
                out.setdefault(cid, set()).add(owner)
        return out

    def held_by(self, owner: str) -> set[str]:
        return {r[0] for r in self._run("SELECT cid FROM held WHERE owner = ?", [owner])}

    def renew(self, owner: str, cids: Iterable[str]) -> set[str]:
        """Renew ``owner``'s lease on those of ``cids`` it holds here; which ones."""
        stamp = now_iso()
        renewed: set[str] = set()
        wanted = list(dict.fromkeys(cids))
        with self._lock:
            self._db.execute("BEGIN")
            try:
                for i in range(0, len(wanted), 500):
                    chunk = wanted[i : i + 500]
                    marks = ",".join("?" * len(chunk))
                    self._db.execute(
                        f"UPDATE held SET renewed = ? WHERE owner = ? AND cid IN ({marks})",
                        (stamp, owner, *chunk),
                    )
                    renewed |= {
                        r[0]
                        for r in self._db.execute(
                            f"SELECT cid FROM held WHERE owner = ? AND cid IN ({marks})",
                            (owner, *chunk),
                        )
                    }
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return renewed

    def expired(self, seconds: float, besides: str) -> list[tuple[str, str]]:
        """(cid, owner) of the holds for owners other than ``besides`` whose lease was last
        renewed more than ``seconds`` ago."""
        before = (datetime.now(UTC) - timedelta(seconds=seconds)).strftime(_ISO)
        rows = self._run(
            "SELECT cid, owner FROM held WHERE owner != ? AND COALESCE(renewed, pinned) < ?",
            [besides, before],
        )
        return [(r[0], r[1]) for r in rows]

    def release(self, cid: str, owner: str) -> bool:
        """Drop one owner's hold; True when nobody holds the CID any more (unpin it)."""
        self._run("DELETE FROM held WHERE cid = ? AND owner = ?", [cid, owner])
        return not self._run("SELECT 1 FROM held WHERE cid = ? LIMIT 1", [cid])

    def forget_model(self, cid: str) -> None:
        """Drop an owned model, its placements and their audits (``fusenode rm``)."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.execute(
                    "DELETE FROM audits WHERE cid IN "
                    "(SELECT cid FROM placements WHERE manifest = ?)",
                    (cid,),
                )
                self._db.execute("DELETE FROM placements WHERE manifest = ?", (cid,))
                self._db.execute("DELETE FROM models WHERE cid = ?", (cid,))
                self._db.execute("DELETE FROM meta WHERE key = ?", (self._INFO_KEY + cid,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    # -- garbage collection ------------------------------------------------------------------
    def record_gc(self, trigger: str, report: dict) -> None:
        """Keep one gc run's report (the last `GC_RUNS_KEPT`)."""
        with self._lock:
            self._db.execute(
                "INSERT INTO gc_runs (started, trigger, report) VALUES (?, ?, ?)",
                (report.get("started") or now_iso(), trigger, json.dumps(report)),
            )
            self._db.execute(
                "DELETE FROM gc_runs WHERE id <= (SELECT MAX(id) FROM gc_runs) - ?",
                (GC_RUNS_KEPT,),
            )
            self._db.execute(
                "INSERT INTO meta VALUES ('gc_runs_total', '1') ON CONFLICT(key) DO UPDATE "
                "SET value = CAST(value AS INTEGER) + 1"
            )

    def gc_total(self) -> int:
        """How many gc runs this node has made, ever (a Prometheus counter's value)."""
        rows = self._run("SELECT value FROM meta WHERE key = 'gc_runs_total'")
        return int(rows[0][0]) if rows else 0

    def gc_runs(self, limit: int = GC_RUNS_KEPT) -> list[dict]:
        """The last gc runs, newest first: each report with its ``trigger``."""
        rows = self._run(
            "SELECT trigger, report FROM gc_runs ORDER BY id DESC LIMIT ?", [int(limit)]
        )
        return [{**json.loads(r[1]), "trigger": r[0]} for r in rows]

    def last_gc(self) -> dict | None:
        runs = self.gc_runs(1)
        return runs[0] if runs else None

    # -- jobs --------------------------------------------------------------------------------
    def submit_job(
        self,
        kind: str,
        source: str,
        pass_name: str,
        pass_version: str,
        recipients: list[str],
        origin: str,
        *,
        retry_failed: bool = True,
    ) -> tuple[dict, bool]:
        """The job for this request: an existing one (returned as is, unless it failed and
        ``retry_failed``: then it is queued again) or a new one. Returns (job,
        created_or_requeued)."""
        key = json.dumps(sorted(set(recipients)))
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(
                    "SELECT * FROM jobs WHERE kind = ? AND source = ? AND pass = ? "
                    "AND pass_version = ? AND recipients = ?",
                    (kind, source, pass_name, pass_version, key),
                ).fetchone()
                changed = False
                if row is None:
                    self._db.execute(
                        "INSERT INTO jobs (kind, source, pass, pass_version, recipients, state, "
                        "origin, created) VALUES (?, ?, ?, ?, ?, 'queued', ?, ?)",
                        (kind, source, pass_name, pass_version, key, origin, now_iso()),
                    )
                    changed = True
                elif retry_failed and row[JOB_COLUMNS.index("state")] == "failed":
                    self._db.execute(
                        "UPDATE jobs SET state = 'queued', started = NULL, finished = NULL "
                        "WHERE id = ?",
                        (row[0],),
                    )
                    changed = True
                row = self._db.execute(
                    "SELECT * FROM jobs WHERE kind = ? AND source = ? AND pass = ? "
                    "AND pass_version = ? AND recipients = ?",
                    (kind, source, pass_name, pass_version, key),
                ).fetchone()
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return _job_dict(row), changed

    def job(self, job_id: int) -> dict | None:
        rows = self._run("SELECT * FROM jobs WHERE id = ?", [job_id])
        return _job_dict(rows[0]) if rows else None

    def jobs(self) -> list[dict]:
        return [_job_dict(r) for r in self._run("SELECT * FROM jobs ORDER BY id")]

    def job_counts(self) -> dict[str, int]:
        """Jobs by state (every state, 0 when none)."""
        counts = dict.fromkeys(("queued", "running", "done", "failed"), 0)
        for state, count in self._run("SELECT state, COUNT(*) FROM jobs GROUP BY state"):
            counts[state] = int(count)
        return counts

    def next_queued_job(self) -> dict | None:
        """Claim the oldest queued job (mark it running)."""
        with self._lock:
            row = self._db.execute(
                "SELECT id FROM jobs WHERE state = 'queued' ORDER BY id LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            self._db.execute(
                "UPDATE jobs SET state = 'running', started = ?, attempts = attempts + 1 "
                "WHERE id = ?",
                (now_iso(), row[0]),
            )
        return self.job(row[0])

    def finish_job(self, job_id: int, result: str, report: dict) -> None:
        self._run(
            "UPDATE jobs SET state = 'done', result = ?, error = NULL, report = ?, finished = ? "
            "WHERE id = ?",
            [result, json.dumps(report), now_iso(), job_id],
        )

    def fail_job(self, job_id: int, error: str) -> None:
        self._run(
            "UPDATE jobs SET state = 'failed', error = ?, finished = ? WHERE id = ?",
            [error[:2000], now_iso(), job_id],
        )

    def requeue_interrupted_jobs(self) -> int:
        """Jobs left running by a daemon that stopped (or died): run them again."""
        with self._lock:
            cur = self._db.execute(
                "UPDATE jobs SET state = 'queued', started = NULL WHERE state = 'running'"
            )
            return cur.rowcount

    # -- peers -------------------------------------------------------------------------------
    def peer_answered(self, peer_id: str, addresses: list[str] | None = None) -> None:
        stamp = now_iso()
        addrs = json.dumps(addresses) if addresses else None
        self._run(
            "INSERT INTO peers VALUES (?, ?, ?, NULL, ?) ON CONFLICT(peer_id) DO UPDATE "
            "SET last_seen = excluded.last_seen, last_error = NULL, "
            "addresses = COALESCE(excluded.addresses, peers.addresses)",
            [peer_id, stamp, stamp, addrs],
        )

    def peer_learned(self, peer_id: str, addresses: list[str]) -> bool:
        """Remember a peer another peer told us about (never seen answering yet); True when
        it was new. Known peers keep the addresses they reported themselves."""
        stamp = now_iso()
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO peers VALUES (?, ?, NULL, NULL, ?) ON CONFLICT(peer_id) DO NOTHING",
                (peer_id, stamp, json.dumps(addresses)),
            )
            return cur.rowcount == 1

    def peer_failed(self, peer_id: str, error: str) -> None:
        self._run(
            "INSERT INTO peers VALUES (?, ?, NULL, ?, NULL) ON CONFLICT(peer_id) DO UPDATE "
            "SET last_error = excluded.last_error",
            [peer_id, now_iso(), error[:500]],
        )

    def peer(self, peer_id: str) -> PeerRecord | None:
        rows = self._run("SELECT * FROM peers WHERE peer_id = ?", [peer_id])
        return PeerRecord(*rows[0]) if rows else None

    def peers(self) -> list[PeerRecord]:
        return [PeerRecord(*r) for r in self._run("SELECT * FROM peers ORDER BY peer_id")]

    def recent_peers(self, seconds: float) -> list[PeerRecord]:
        """Peers that answered within the last ``seconds``, most recent first."""
        since = (datetime.now(UTC) - timedelta(seconds=seconds)).strftime(_ISO)
        rows = self._run(
            "SELECT * FROM peers WHERE last_seen >= ? ORDER BY last_seen DESC", [since]
        )
        return [PeerRecord(*r) for r in rows]

    # -- audits ------------------------------------------------------------------------------
    def record_audit(self, cid: str, peer: str, result: str, detail: str = "") -> int:
        """Record the audit of fragment ``cid`` on ``peer``; how many audits in a row it has
        gone unanswered (0 unless ``result`` is "unanswered")."""
        with self._lock:
            row = self._db.execute(
                "SELECT unanswered FROM audits WHERE cid = ? AND peer = ?", (cid, peer)
            ).fetchone()
            streak = (row[0] if row else 0) + 1 if result == "unanswered" else 0
            self._db.execute(
                "INSERT OR REPLACE INTO audits VALUES (?, ?, ?, ?, ?, ?)",
                (cid, peer, now_iso(), result, detail[:500], streak),
            )
            return streak

    def audits(self, cids: Iterable[str] | None = None) -> dict[tuple[str, str], dict]:
        """The last audit of each (fragment, holder): {"time", "result", "detail"}."""
        rows = self._run("SELECT cid, peer, time, result, detail FROM audits")
        wanted = None if cids is None else set(cids)
        return {
            (r[0], r[1]): {"time": r[2], "result": r[3], "detail": r[4] or None}
            for r in rows
            if wanted is None or r[0] in wanted
        }

    def update_score(self, peer: str, passed: bool, forget: float) -> float:
        """Fold one audit into ``peer``'s reputation (alpha, beta with forgetting factor
        ``forget``, starting from alpha=1, beta=0); its new score alpha / (alpha + beta)."""
        with self._lock:
            row = self._db.execute(
                "SELECT alpha, beta, passed, failed FROM scores WHERE peer = ?", (peer,)
            ).fetchone()
            alpha, beta, ok, bad = row if row else (1.0, 0.0, 0, 0)
            alpha = forget * alpha + (1.0 if passed else 0.0)
            beta = forget * beta + (0.0 if passed else 1.0)
            self._db.execute(
                "INSERT OR REPLACE INTO scores VALUES (?, ?, ?, ?, ?, ?)",
                (peer, alpha, beta, ok + passed, bad + (not passed), now_iso()),
            )
            return alpha / (alpha + beta)

    def scores(self) -> dict[str, dict]:
        rows = self._run("SELECT peer, alpha, beta, passed, failed, updated FROM scores")
        return {
            r[0]: {
                "score": round(r[1] / (r[1] + r[2]), 4),
                "passed": r[3],
                "failed": r[4],
                "updated": r[5],
            }
            for r in rows
        }

    # -- copies repair made surplus ----------------------------------------------------------
    def add_surplus(self, manifest: str, cid: str, peer: str) -> None:
        self._run(
            "INSERT OR IGNORE INTO surplus VALUES (?, ?, ?, ?)", [cid, peer, manifest, now_iso()]
        )

    def surplus(self) -> list[tuple[str, str]]:
        """(cid, peer) of every copy this node no longer counts, oldest first."""
        return [(r[0], r[1]) for r in self._run("SELECT cid, peer FROM surplus ORDER BY created")]

    def drop_surplus(self, cid: str, peer: str) -> None:
        self._run("DELETE FROM surplus WHERE cid = ? AND peer = ?", [cid, peer])
