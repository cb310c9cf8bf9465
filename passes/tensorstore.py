"""Where the bytes of a model's large tensors live while passes work on its skeleton.

A :class:`TensorStore` resolves the placeholder references ``#fusenode-ref:<id>`` that
:mod:`modelwire` puts in the skeleton on load: each names an :class:`Extent` (file, offset,
length) of the input, or a :class:`Computed` value produced only when the output is written.
Passes read tensors with :meth:`TensorStore.array` (a zero-copy view of the mapped file) and
store replacements with :meth:`TensorStore.set_array`; large replacements are spilled to an
unlinked temporary file, so memory stays at a few tensors whatever the model size.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fusenode.passes.errors import ModelFileError
from fusenode.passes.onnxproto import (
    TensorProto,
    np_dtype_to_tensor_dtype,
    tensor_dtype_to_np_dtype,
    to_array,
)

#: Tensor payloads smaller than this stay inline in the skeleton (same rule as onnx's
#: external-data converter).
INLINE_LIMIT = 1024
#: Placeholder locations start with "#": onnx's checker then looks for no file (LazyModel.check).
REF = "#fusenode-ref:"
_COPY_CHUNK = 64 * 2**20


@dataclass(frozen=True)
class Extent:
    """``length`` bytes at ``offset`` in source number ``source`` of a :class:`TensorStore`."""

    source: int
    offset: int
    length: int


@dataclass(frozen=True)
class Computed:
    """A tensor value computed when it is needed (at save time), not held in between.

    Passes use it for results as large as the weights they replace: the fused weight is
    produced while the output is written, straight from the input's pages.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    compute: Callable[[], np.ndarray]

    @property
    def length(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class TensorStore:
    """Where the payload of every externalized tensor lives; owns the open files."""

    def __init__(self, spill_dir: Path | None = None) -> None:
        self._fds: list[int] = []
        self._paths: list[str] = []
        self._maps: dict[int, mmap.mmap] = {}
        self._by_path: dict[str, int] = {}
        self._extents: list[Extent | Computed] = []
        self._spill_dir = spill_dir
        self._spill: int | None = None  # source number of the spill file, once created
        self._spill_size = 0

    # -- sources -------------------------------------------------------------------------
    def source_for(self, path: Path) -> int:
        key = str(path)
        if key not in self._by_path:
            try:
                fd = os.open(key, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError as e:
                raise ModelFileError(f"cannot open external data {key}: {e.strerror}") from e
            self._by_path[key] = len(self._fds)
            self._fds.append(fd)
            self._paths.append(key)
        return self._by_path[key]

    def source_size(self, source: int) -> int:
        return os.fstat(self._fds[source]).st_size

    def _spill_source(self) -> int:
        if self._spill is None:
            spill_dir = self._spill_dir or Path(tempfile.gettempdir())
            # Keep only a descriptor: the file is unlinked and vanishes with it.
            with tempfile.TemporaryFile(dir=spill_dir, prefix=".fusenode-spill-") as f:
                self._spill = len(self._fds)
                self._fds.append(os.dup(f.fileno()))
            self._paths.append("<spill>")
        return self._spill

    def close(self) -> None:
        self._extents.clear()  # drops Computed closures that may hold views of the maps
        for mm in self._maps.values():
            with contextlib.suppress(BufferError):  # a caller still holds a view: GC closes it
                mm.close()
        self._maps.clear()
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
        self._paths.clear()
        self._by_path.clear()
        self._spill = None

    # -- references ----------------------------------------------------------------------
    def reference(self, extent: Extent | Computed) -> str:
        self._extents.append(extent)
        return f"{REF}{len(self._extents) - 1}"

    @staticmethod
    def ref_id(tensor: TensorProto) -> int | None:
        if tensor.data_location != TensorProto.EXTERNAL:
            return None
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value.startswith(REF):
                return int(entry.value[len(REF) :])
        return None

    def extent(self, tensor: TensorProto) -> Extent | Computed | None:
        ref = self.ref_id(tensor)
        return None if ref is None else self._extents[ref]

    def _view(self, extent: Extent) -> memoryview | bytes:
        """The extent's bytes: a zero-copy view of the mapped file (pread for the spill)."""
        if extent.source == self._spill:
            data = os.pread(self._fds[extent.source], extent.length, extent.offset)
        else:
            mm = self._maps.get(extent.source)
            if mm is None:
                mm = mmap.mmap(self._fds[extent.source], 0, access=mmap.ACCESS_READ)
                self._maps[extent.source] = mm
            data = memoryview(mm)[extent.offset : extent.offset + extent.length]
        if len(data) != extent.length:
            raise ModelFileError(
                f"truncated data in {self._paths[extent.source]}: wanted {extent.length} bytes "
                f"at offset {extent.offset}, got {len(data)}"
            )
        return data

    def release(self, extent: Extent | Computed | None) -> None:
        """Let the kernel drop a mapped extent's pages from this process (they stay in the
        page cache): keeps peak RSS at a few tensors while every weight gets read."""
        if isinstance(extent, Extent) and extent.source in self._maps:
            start = extent.offset - extent.offset % mmap.PAGESIZE
            with contextlib.suppress(OSError, ValueError):
                self._maps[extent.source].madvise(
                    mmap.MADV_DONTNEED, start, extent.offset + extent.length - start
                )

    def write_to(self, piece: Extent | Computed, out_fd: int) -> None:
        """Append the piece's bytes to ``out_fd``; file extents are copied by the kernel."""
        if isinstance(piece, Computed):
            data = little_endian(piece.compute())
            write_all(out_fd, bytes_view(data))
            return
        src = self._fds[piece.source]
        offset, left = piece.offset, piece.length
        while left:
            try:
                n = os.copy_file_range(src, out_fd, min(left, _COPY_CHUNK), offset)
            except OSError:
                n = 0
            if n <= 0:  # unsupported here, or a short copy: plain read/write for the rest
                data = os.pread(src, min(left, _COPY_CHUNK), offset)
                if not data:
                    raise ModelFileError(f"truncated data in {self._paths[piece.source]}")
                write_all(out_fd, data)
                n = len(data)
            offset += n
            left -= n

    # -- tensors as arrays ---------------------------------------------------------------
    def array(self, tensor: TensorProto) -> np.ndarray:
        """The tensor's value (a read-only view when it comes from a file)."""
        extent = self.extent(tensor)
        if extent is None:
            try:
                return to_array(tensor)
            except Exception as e:
                raise ModelFileError(f"tensor {tensor.name!r} cannot be decoded: {e}") from e
        if isinstance(extent, Computed):
            return extent.compute()
        dtype = np_dtype(tensor.data_type)
        shape = tuple(tensor.dims)
        expected = math.prod(shape) * dtype.itemsize
        if expected != extent.length:
            raise ModelFileError(
                f"tensor {tensor.name!r}: {extent.length} bytes of data for shape {list(shape)} "
                f"of {dtype.name} ({expected} bytes)"
            )
        return np.frombuffer(self._view(extent), dtype=dtype.newbyteorder("<")).reshape(shape)

    def set_array(self, tensor: TensorProto, array: np.ndarray | Computed) -> None:
        """Replace the tensor's value (and dims) by ``array``, keeping its name."""
        if np_dtype(tensor.data_type) != array.dtype:
            raise TypeError(f"{tensor.name}: {array.dtype} for a tensor of {tensor.data_type}")
        name = tensor.name
        tensor.Clear()
        tensor.name = name
        tensor.data_type = _onnx_dtype(array.dtype)
        tensor.dims.extend(array.shape)
        if isinstance(array, Computed):
            set_ref(tensor, self.reference(array))
            return
        data = little_endian(array)
        if data.nbytes < INLINE_LIMIT:
            tensor.raw_data = data.tobytes()
            return
        source = self._spill_source()
        offset = self._spill_size
        write_all(self._fds[source], bytes_view(data))
        self._spill_size += data.nbytes
        set_ref(tensor, self.reference(Extent(source, offset, data.nbytes)))


def bytes_view(array: np.ndarray) -> memoryview:
    """The array's bytes without a copy (works for dtypes the buffer protocol lacks, bf16)."""
    return memoryview(array.reshape(-1).view(np.uint8))


def little_endian(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False)


def np_dtype(data_type: int) -> np.dtype:
    try:
        return np.dtype(tensor_dtype_to_np_dtype(data_type))
    except Exception as e:
        raise ModelFileError(f"unsupported tensor data type {data_type}") from e


def _onnx_dtype(dtype: np.dtype) -> int:
    return np_dtype_to_tensor_dtype(dtype)


def set_ref(tensor: TensorProto, ref: str) -> None:
    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key = "location"
    entry.value = ref


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
