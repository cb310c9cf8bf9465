"""Read and write ONNX models without holding their weights in memory.

A :class:`LazyModel` is an ``onnx.ModelProto`` *skeleton* (graph, nodes, attributes, small
tensors) plus a :class:`TensorStore` that knows where each large tensor's bytes live:

- on load, the file is walked with :mod:`passes.protowire`; every tensor payload of at least
  :data:`INLINE_LIMIT` bytes (``raw_data``, or external data of a >2 GB model) is replaced in
  the skeleton by a placeholder reference ``fusenode-ref:<id>`` to an :class:`Extent`
  (file, offset, length). Only the skeleton (kilobytes) is parsed by protobuf.
- passes read the tensors they need (:meth:`TensorStore.array`) and store replacements
  (:meth:`TensorStore.set_array`); large replacements are spilled to an unlinked temporary file,
  so memory stays at a few tensors whatever the model size.
- on save, the skeleton is serialized deterministically and walked again; every placeholder is
  spliced back as ``raw_data`` (inline model) or as external data in ``OUT.data`` (models over
  the protobuf limit, or whose input already used external data). Payloads are copied
  file-to-file by the kernel (``copy_file_range``), never through Python objects.

The output is written atomically (temporary file in the target folder, fsync, rename) and the
same input gives byte-identical output.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from fusenode.passes.errors import ModelFileError, OutputError
from fusenode.passes.protowire import LEN, VARINT, WireError, encode_key, encode_varint, iter_fields
from onnx import TensorProto, helper, numpy_helper

#: Tensor payloads smaller than this stay inline in the skeleton (same rule as onnx's
#: external-data converter).
INLINE_LIMIT = 1024
#: A serialized protobuf message may not exceed 2 GiB; stay clear of it.
PROTOBUF_LIMIT = 2**31 - 2**24
#: Alignment of tensors in an external data file (page size: lets runtimes mmap them).
EXTERNAL_ALIGN = 4096
_REF = "fusenode-ref:"
_COPY_CHUNK = 64 * 2**20

# onnx.proto field numbers used by the walker.
_MODEL_GRAPH = 7
_GRAPH_NODE, _GRAPH_INITIALIZER = 1, 5
_NODE_ATTRIBUTE = 5
_ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS = 5, 6, 10, 11
_T_DIMS, _T_NAME, _T_RAW, _T_EXTERNAL, _T_LOCATION = 1, 8, 9, 13, 14


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
        return f"{_REF}{len(self._extents) - 1}"

    @staticmethod
    def ref_id(tensor: TensorProto) -> int | None:
        if tensor.data_location != TensorProto.EXTERNAL:
            return None
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value.startswith(_REF):
                return int(entry.value[len(_REF) :])
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
            data = _little_endian(piece.compute())
            _write_all(out_fd, _bytes_view(data))
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
                _write_all(out_fd, data)
                n = len(data)
            offset += n
            left -= n

    # -- tensors as arrays ---------------------------------------------------------------
    def array(self, tensor: TensorProto) -> np.ndarray:
        """The tensor's value (a read-only view when it comes from a file)."""
        extent = self.extent(tensor)
        if extent is None:
            try:
                return numpy_helper.to_array(tensor)
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
            _set_ref(tensor, self.reference(array))
            return
        data = _little_endian(array)
        if data.nbytes < INLINE_LIMIT:
            tensor.raw_data = data.tobytes()
            return
        source = self._spill_source()
        offset = self._spill_size
        _write_all(self._fds[source], _bytes_view(data))
        self._spill_size += data.nbytes
        _set_ref(tensor, self.reference(Extent(source, offset, data.nbytes)))


def _bytes_view(array: np.ndarray) -> memoryview:
    """The array's bytes without a copy (works for dtypes the buffer protocol lacks, bf16)."""
    return memoryview(array.reshape(-1).view(np.uint8))


def _little_endian(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False)


def np_dtype(data_type: int) -> np.dtype:
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(data_type))
    except Exception as e:
        raise ModelFileError(f"unsupported tensor data type {data_type}") from e


def _onnx_dtype(dtype: np.dtype) -> int:
    return helper.np_dtype_to_tensor_dtype(dtype)


def _set_ref(tensor: TensorProto, ref: str) -> None:
    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key = "location"
    entry.value = ref


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


# ---------------------------------------------------------------------------------------
# Loading: file -> skeleton + extents


class _Loader:
    def __init__(self, path: Path, store: TensorStore) -> None:
        self.path = path
        self.base = path.parent
        self.store = store
        self.uses_external = False

    def model(self, buf: memoryview, source: int) -> bytes:
        self.source = source
        self.file_size = len(buf)
        return self._message(buf, 0, len(buf), self._model_field)

    def _message(self, buf, start, end, on_field) -> bytes:
        out: list[bytes] = []
        for field, wt, fs, vs, ve in iter_fields(buf, start, end):
            replaced = on_field(buf, field, wt, vs, ve) if wt == LEN else None
            if replaced is None:
                out.append(bytes(buf[fs:ve]))
            else:
                out.append(encode_key(field, LEN) + encode_varint(len(replaced)) + replaced)
        return b"".join(out)

    def _model_field(self, buf, field, wt, vs, ve):
        if field == _MODEL_GRAPH:
            return self._message(buf, vs, ve, self._graph_field)
        return None

    def _graph_field(self, buf, field, wt, vs, ve):
        if field == _GRAPH_NODE:
            return self._message(buf, vs, ve, self._node_field)
        if field == _GRAPH_INITIALIZER:
            return self._tensor(buf, vs, ve)
        return None

    def _node_field(self, buf, field, wt, vs, ve):
        if field == _NODE_ATTRIBUTE:
            return self._message(buf, vs, ve, self._attr_field)
        return None

    def _attr_field(self, buf, field, wt, vs, ve):
        if field in (_ATTR_T, _ATTR_TENSORS):
            return self._tensor(buf, vs, ve)
        if field in (_ATTR_G, _ATTR_GRAPHS):
            return self._message(buf, vs, ve, self._graph_field)
        return None

    def _tensor(self, buf, start, end) -> bytes | None:
        raw: tuple[int, int] | None = None
        external: dict[str, str] = {}
        location = 0
        keep: list[bytes] = []  # every field but the payload ones, verbatim
        for field, wt, fs, vs, ve in iter_fields(buf, start, end):
            if field not in (_T_RAW, _T_EXTERNAL, _T_LOCATION):
                keep.append(bytes(buf[fs:ve]))
            if field == _T_RAW and wt == LEN:
                raw = (vs, ve)
            elif field == _T_EXTERNAL and wt == LEN:
                key = value = ""
                for f2, w2, _, s2, e2 in iter_fields(buf, vs, ve):
                    if w2 == LEN and f2 == 1:
                        key = bytes(buf[s2:e2]).decode("utf-8", "replace")
                    elif w2 == LEN and f2 == 2:
                        value = bytes(buf[s2:e2]).decode("utf-8", "replace")
                external[key] = value
            elif field == _T_LOCATION and wt == VARINT:
                location = buf[vs]  # enum values 0/1 fit in one byte
        if location == TensorProto.EXTERNAL:
            extent = self._external_extent(external)
            self.uses_external = True
        elif raw is not None and raw[1] - raw[0] >= INLINE_LIMIT:
            extent = Extent(self.source, raw[0], raw[1] - raw[0])
        else:
            return None
        # The tensor without its payload fields, pointing at the extent instead.
        t = TensorProto()
        _set_ref(t, self.store.reference(extent))
        keep.append(t.SerializeToString())
        return b"".join(keep)

    def _external_extent(self, entries: dict[str, str]) -> Extent:
        location = entries.get("location", "")
        rel = Path(location)
        if not location or rel.is_absolute() or ".." in rel.parts:
            raise ModelFileError(f"external data location {location!r} is not a relative path")
        path = (self.base / rel).resolve()
        source = self.store.source_for(path)
        size = self.store.source_size(source)
        try:
            offset = int(entries.get("offset", "0"))
            length = int(entries["length"]) if "length" in entries else size - offset
        except ValueError as e:
            raise ModelFileError(f"bad external data offset/length for {location}") from e
        if offset < 0 or length < 0 or offset + length > size:
            raise ModelFileError(
                f"external data {location} is truncated: needs {offset + length} bytes, has {size}"
            )
        return Extent(source, offset, length)


# ---------------------------------------------------------------------------------------
# Saving: skeleton + extents -> file

_Piece = bytes | Extent | Computed


class _Saver:
    """Turns the serialized skeleton into pieces (bytes or extents) of the output file(s)."""

    def __init__(self, store: TensorStore, data_name: str | None) -> None:
        self.store = store
        self.data_name = data_name  # None: inline everything
        self.data_pieces: list[_Piece] = []
        self.data_size = 0

    def model(self, buf: bytes) -> tuple[list[_Piece], int]:
        return self._message(memoryview(buf), 0, len(buf), self._model_field)

    def _message(self, buf, start, end, on_field) -> tuple[list[_Piece], int]:
        pieces: list[_Piece] = []
        size = 0
        for field, wt, fs, vs, ve in iter_fields(buf, start, end):
            child = on_field(buf, field, vs, ve) if wt == LEN else None
            if child is None:
                pieces.append(bytes(buf[fs:ve]))
                size += ve - fs
            else:
                sub, sub_size = child
                head = encode_key(field, LEN) + encode_varint(sub_size)
                pieces.append(head)
                pieces.extend(sub)
                size += len(head) + sub_size
        return pieces, size

    def _model_field(self, buf, field, vs, ve):
        if field == _MODEL_GRAPH:
            return self._message(buf, vs, ve, self._graph_field)
        return None

    def _graph_field(self, buf, field, vs, ve):
        if field == _GRAPH_NODE:
            return self._message(buf, vs, ve, self._node_field)
        if field == _GRAPH_INITIALIZER:
            return self._tensor(buf, vs, ve, may_externalize=True)
        return None

    def _node_field(self, buf, field, vs, ve):
        if field == _NODE_ATTRIBUTE:
            return self._message(buf, vs, ve, self._attr_field)
        return None

    def _attr_field(self, buf, field, vs, ve):
        if field in (_ATTR_T, _ATTR_TENSORS):
            # Attribute tensors (Constant values) stay inline: not every runtime resolves
            # external data there, and they are small in practice.
            return self._tensor(buf, vs, ve, may_externalize=False)
        if field in (_ATTR_G, _ATTR_GRAPHS):
            return self._message(buf, vs, ve, self._graph_field)
        return None

    def _tensor(self, buf, start, end, may_externalize: bool):
        t = TensorProto()
        t.ParseFromString(bytes(buf[start:end]))  # small: payload is a placeholder
        extent = self.store.extent(t)
        if extent is None:
            return None
        head = [
            bytes(buf[fs:ve])
            for field, _wt, fs, _vs, ve in iter_fields(buf, start, end)
            if field not in (_T_RAW, _T_EXTERNAL, _T_LOCATION)
        ]
        head_bytes = b"".join(head)
        if self.data_name is None or not may_externalize:
            raw_head = encode_key(_T_RAW, LEN) + encode_varint(extent.length)
            return [head_bytes, raw_head, extent], len(head_bytes) + len(raw_head) + extent.length
        pad = -self.data_size % EXTERNAL_ALIGN
        if pad:
            self.data_pieces.append(b"\0" * pad)
        offset = self.data_size + pad
        self.data_pieces.append(extent)
        self.data_size = offset + extent.length
        ext = TensorProto()
        ext.data_location = TensorProto.EXTERNAL
        for key, value in (
            ("location", self.data_name),
            ("offset", str(offset)),
            ("length", str(extent.length)),
        ):
            entry = ext.external_data.add()
            entry.key, entry.value = key, value
        tail = ext.SerializeToString()
        return [head_bytes, tail], len(head_bytes) + len(tail)


# ---------------------------------------------------------------------------------------


class LazyModel:
    """An ONNX model whose large tensors stay on disk until needed. Use as a context manager."""

    def __init__(self, model: onnx.ModelProto, store: TensorStore, source: Path, external: bool):
        self.model = model
        self.store = store
        self.source = source
        self.uses_external_data = external

    @classmethod
    def load(cls, path: str | os.PathLike, spill_dir: Path | None = None) -> LazyModel:
        path = Path(path)
        try:
            st = path.stat()
        except FileNotFoundError:
            raise ModelFileError(f"{path}: no such file") from None
        except OSError as e:
            raise ModelFileError(f"{path}: {e.strerror}") from e
        if stat.S_ISDIR(st.st_mode):
            raise ModelFileError(f"{path}: is a directory, not an ONNX file")
        if st.st_size == 0:
            raise ModelFileError(f"{path}: empty file, not an ONNX model")
        store = TensorStore(spill_dir)
        try:
            source = store.source_for(path.resolve())
            loader = _Loader(path, store)
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                view = memoryview(mm)
                try:
                    skeleton = loader.model(view, source)
                except WireError as e:
                    raise ModelFileError(f"{path}: not an ONNX model or truncated ({e})") from e
                finally:
                    view.release()
            model = onnx.ModelProto()
            try:
                model.ParseFromString(skeleton)
            except Exception as e:
                raise ModelFileError(f"{path}: not an ONNX model ({e})") from e
            if not model.HasField("graph") or not model.opset_import or model.ir_version <= 0:
                raise ModelFileError(f"{path}: not an ONNX model (no graph, opset or IR version)")
        except BaseException:
            store.close()
            raise
        return cls(model, store, path, loader.uses_external)

    def __enter__(self) -> LazyModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.store.close()

    # -- validation --------------------------------------------------------------------
    def check(self, what: str | None = None) -> None:
        """Run onnx's checker on the skeleton (placeholders point at an empty stand-in file).

        Catches structural errors (unsorted graph, unknown operator, bad attributes) without
        reading any weight.
        """
        checked = onnx.ModelProto()
        checked.CopyFrom(self.model)
        for tensor in _all_tensors(checked.graph):
            if self.store.ref_id(tensor) is not None:
                tensor.external_data[0].value = "placeholder.bin"
        with tempfile.TemporaryDirectory(prefix="fusenode-check-") as tmp:
            Path(tmp, "placeholder.bin").touch()
            model_path = Path(tmp, "model.onnx")
            model_path.write_bytes(checked.SerializeToString())
            try:
                onnx.checker.check_model(str(model_path))
            except Exception as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ModelFileError(f"{what or self.source}: invalid ONNX model: {first}") from e

    # -- saving ------------------------------------------------------------------------
    def total_payload(self) -> int:
        return sum(
            ext.length
            for t in _all_tensors(self.model.graph)
            if (ext := self.store.extent(t)) is not None
        )

    def save(
        self, path: str | os.PathLike, external: bool | None = None, durable: bool = True
    ) -> list[Path]:
        """Write the model atomically; return the files written.

        ``external=None`` keeps the input's layout, switching to external data when an inline
        file would exceed the protobuf limit. ``durable`` fsyncs before the rename (survives
        power loss, at about 0.5 s per GB); without it the rename still guarantees that a
        reader sees either the old file or the complete new one.
        """
        path = Path(path)
        if external is None:
            external = self.uses_external_data or self.total_payload() > PROTOBUF_LIMIT
        data_name = path.name + ".data" if external else None
        skeleton = self.model.SerializeToString(deterministic=True)
        saver = _Saver(self.store, data_name)
        pieces, _size = saver.model(skeleton)
        outputs = [(path, pieces)]
        if data_name is not None:  # the data file lands first: the model then never
            outputs.insert(0, (path.with_name(data_name), saver.data_pieces))  # points at none
        temps: list[_AtomicFile] = []
        try:
            for target, parts in outputs:
                temps.append(_AtomicFile(target, durable))
                try:
                    self._write_pieces(temps[-1].fd, parts)
                except OSError as e:
                    raise OutputError(f"{target}: write failed: {e.strerror}") from e
            for temp in temps:
                temp.commit()
        finally:
            for temp in temps:
                temp.discard()
        return [target for target, _ in outputs]

    def _write_pieces(self, fd: int, pieces: list[_Piece]) -> None:
        """Write pieces in order; Computed values are produced on two worker threads, at most
        a few ahead of the writer, so computing overlaps writing and memory stays bounded."""
        computed = [p for p in pieces if isinstance(p, Computed)]
        ahead: dict[int, Future] = {}
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="fusenode-compute") as pool:
            next_submit = 0

            def refill() -> None:
                nonlocal next_submit
                while next_submit < len(computed) and len(ahead) < 3:
                    c = computed[next_submit]
                    ahead[id(c)] = pool.submit(lambda c=c: _little_endian(c.compute()))
                    next_submit += 1

            pending: list[bytes] = []
            for piece in pieces:
                if isinstance(piece, bytes):
                    pending.append(piece)
                    continue
                if pending:
                    _write_all(fd, b"".join(pending))
                    pending.clear()
                if isinstance(piece, Computed):
                    refill()
                    data = ahead.pop(id(piece)).result()
                    if data.nbytes != piece.length:
                        raise ModelFileError("computed tensor size does not match its shape")
                    _write_all(fd, _bytes_view(data))
                    del data
                    refill()
                else:
                    self.store.write_to(piece, fd)
            if pending:
                _write_all(fd, b"".join(pending))


def _all_tensors(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _all_tensors(attr.g)
            for g in attr.graphs:
                yield from _all_tensors(g)


class _AtomicFile:
    """A temporary file beside ``path`` that replaces it on :meth:`commit`, else vanishes."""

    def __init__(self, path: Path, durable: bool = True) -> None:
        self.path = path
        self.durable = durable
        folder = path.parent
        try:
            self.fd, self.tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
        except FileNotFoundError:
            raise OutputError(f"{path}: folder {folder} does not exist") from None
        except OSError as e:
            raise OutputError(f"{path}: cannot write in {folder}: {e.strerror}") from e
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(self.fd, 0o666 & ~umask)
        self.committed = False

    def commit(self) -> None:
        try:
            if self.durable:
                os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1
            os.replace(self.tmp, self.path)
        except OSError as e:
            raise OutputError(f"{self.path}: write failed: {e.strerror}") from e
        self.committed = True

    def discard(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if not self.committed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tmp)
