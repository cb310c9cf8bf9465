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
#: A holder fetching and pinning (or storing) one fragment for a placing node.
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
#: How often a daemon redials the known peers that dropped off, and retries bootstrap peers.
KEEP_CONNECTED_EVERY: Final = 5.0
BOOTSTRAP_RETRY: Final = 5.0
#: Local calls into the embedded Kubo, and starting its process.
KUBO_CALL_TIMEOUT: Final = 60.0
KUBO_START_TIMEOUT: Final = 60.0
#: The CLI's wait for a local daemon's quick answers (put and get wait as long as they take).
DAEMON_TIMEOUT: Final = 60.0
DAEMON_HEALTH_TIMEOUT: Final = 2.0

# -- sizes of messages ------------------------------------------------------------------------
#: Local API request bodies carry paths and options, never file contents.
API_MAX_BODY: Final = MiB
#: Peer API JSON bodies (CID lists).
PEER_MAX_BODY: Final = MiB
#: Largest fragment streamed to a holder in one request; bigger ones go through bitswap.
MAX_STREAMED_FRAGMENT: Final = 256 * MiB
