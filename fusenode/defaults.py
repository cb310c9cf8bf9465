"""Every default and limit fusenode has, in one place.

The node's config.toml (node/default-config.toml, the documented copy) states the operator-
facing ones again as TOML; a test checks that file against these values. Layers read them
from here: storage for the format's limits, node for the config's defaults and the API's
bounds, so a default is changed once.
"""

from __future__ import annotations

from typing import Final

MiB: Final = 1 << 20
GiB: Final = 1 << 30

# -- erasure coding and segments (docs/format.md) ------------------------------------------------
#: Fragments needed to rebuild a segment / fragments written per segment. k=4 n=6 tolerates
#: two lost nodes at 1.5x the bytes (Storj-like small-network default).
K: Final = 4
N: Final = 6
#: At most 64 fragments per segment (liberasurecode's limit for the ISA-L Cauchy backend).
MAX_FRAGMENTS: Final = 64
#: Segment size: Storj's 64 MiB keeps a fragment (16 MiB at k=4) small enough for Kubo's
#: whole-object Download (RSS ~4.5x the object) while amortizing per-fragment costs.
SEGMENT_SIZE: Final = 64 * MiB
#: Largest segment a manifest may declare: bounds every reader's memory.
MAX_SEGMENT_SIZE: Final = GiB

# -- time limits (seconds) ---------------------------------------------------------------------
#: One fragment or manifest fetch from the network.
FETCH_TIMEOUT: Final = 60.0
#: A holder storing one fragment streamed by a placing node, and answering.
PIN_TIMEOUT: Final = 120.0
#: A peer's answer to a health check.
HEALTH_TIMEOUT: Final = 3.0
#: A get asks one more holder for a segment when none of its fetches finished for this long
#: (a slow or silently partitioned holder then costs seconds, not the fetch deadline).
HEDGE_AFTER: Final = 5.0
#: A fetch of a fragment no live node claims to hold (Kubo would wait forever).
UNKNOWN_HOLDER_TIMEOUT: Final = 10.0
#: A peer call that takes no explicit deadline (has, unpin, ...).
PEER_CALL_TIMEOUT: Final = 10.0
#: Dialling a peer.
CONNECT_TIMEOUT: Final = 20.0
#: How often the placing node checks its holders, and how long one may be unheard of before
#: its fragments are rebuilt elsewhere (a restart must not trigger a repair).
REPAIR_INTERVAL: Final = 60.0
UNREACHABLE_AFTER: Final = 600.0
#: How often the placing node audits each holder (proof of storage: random blocks of the
#: fragments it holds, fetched from it alone), how long one audit answer may take, and how
#: many of a holder's fragments one pass audits (least recently audited first).
AUDIT_INTERVAL: Final = 600.0
AUDIT_TIMEOUT: Final = 10.0
AUDIT_FRAGMENTS: Final = 64
#: How often a daemon redials the known peers that dropped off, and retries bootstrap peers.
KEEP_CONNECTED_EVERY: Final = 5.0
BOOTSTRAP_RETRY: Final = 5.0
#: A peer counts as live in the node's summary, ls and metrics when its daemon answered a check
#: within this many seconds (the daemon checks every KEEP_CONNECTED_EVERY: three missed).
LIVE_WINDOW: Final = 3 * KEEP_CONNECTED_EVERY
#: How long a put waits for peers that answered within LIVE_WINDOW but do not now (their Kubo
#: restarting after a gc sweep takes a second or two) before it places without them.
AWAY_WAIT: Final = 10.0
#: The blockstore's size (a walk of its files) is reused for this many seconds by the summary,
#: /metrics and the dashboard.
USAGE_MAX_AGE: Final = 5.0
#: Local calls into the embedded Kubo, and starting its process.
KUBO_CALL_TIMEOUT: Final = 60.0
KUBO_START_TIMEOUT: Final = 60.0
#: The CLI's wait for a local daemon's quick answers (put and get wait as long as they take).
DAEMON_TIMEOUT: Final = 60.0
DAEMON_HEALTH_TIMEOUT: Final = 2.0

# -- what a node holds for others ----------------------------------------------------------------
#: ``[storage] capacity`` / ``peer_quota`` "auto": the node offers what it holds for others
#: plus its free disk less a reserve (the larger of these two), and one peer may use at most
#: half of that, so no single key fills a node.
DISK_RESERVE: Final = GiB
DISK_RESERVE_FRACTION: Final = 0.05
AUTO_QUOTA_FRACTION: Final = 0.5
#: Each hold is accounted at least this many bytes (a block file and its metadata cost disk
#: whatever the payload), so a flood of tiny stores still meets the quota.
MIN_HOLD_BYTES: Final = 4096

# -- disk: garbage collection and leases (docs/design.md, "Disk") ---------------------------------
#: ``[storage] gc_interval``: seconds between automatic garbage collections of the blockstore
#: (0: only `fusenode gc`). An hour: a get's fetched blocks stay at most that long.
GC_INTERVAL: Final = 3600.0
#: How long a gc waits for a moment with no transfer in flight before giving up (409).
GC_QUIET_WAIT: Final = 120.0
#: ``[storage] lease_days``: a holder releases what an owner placed on it once the owner has
#: not renewed it for this long (Tahoe-LAFS's leases are 31 days). Owners renew every
#: `LEASE_RENEW_FRACTION` of it, so a lease survives three missed renewals.
LEASE_DAYS: Final = 30.0
LEASE_RENEW_FRACTION: Final = 0.25
#: Renewal and expiry passes run at least this often (seconds), whatever the lease.
LEASE_PASS_MAX: Final = 6 * 3600.0
#: A holder says how long its leases last (the renew reply's ``lease_seconds``): an owner
#: renews there at LEASE_RENEW_FRACTION of it too, but never more often than this (a peer
#: claiming a tiny lease must not make its owners spin).
LEASE_PEER_FLOOR: Final = 60.0

# -- the optimizer -------------------------------------------------------------------------------
#: Largest model an optimizer node accepts, and the limits of its fuse + verify child process
#: (seconds of wall time; address space, 0 = "auto": 6x the model plus 2 GiB, at most 3/4 of
#: the machine's memory).
MAX_MODEL_BYTES: Final = 4 * GiB
OPTIMIZE_TIMEOUT: Final = 1800.0
OPTIMIZE_MEMORY: Final = 0
#: `fusenode verify --recheck` generates inputs at the shapes the signed evidence names: at most
#: this many elements over all inputs (2^26: 256 MiB of float32), else it refuses to run.
RECHECK_MAX_ELEMENTS: Final = 1 << 26

# -- sizes of messages ------------------------------------------------------------------------
#: Local API request bodies carry paths and options, never file contents.
API_MAX_BODY: Final = MiB
#: Peer API JSON bodies (CID lists).
PEER_MAX_BODY: Final = MiB
#: Largest fragment streamed to a holder in one request: a whole segment of the largest size
#: and its header (k = 1 cannot happen, but the bound does not need to know that). The holder
#: writes it to disk as it arrives, so this bounds bytes, not memory.
MAX_STREAMED_FRAGMENT: Final = MAX_SEGMENT_SIZE + 4096
