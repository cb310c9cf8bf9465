"""Read and write ONNX models without holding their weights in memory.

A :class:`LazyModel` is an ``onnx.ModelProto`` *skeleton* (graph, nodes, attributes, small
tensors) plus a :class:`TensorStore` that knows where each large tensor's bytes live:

- on load, the file is walked (:mod:`modelwire` with :mod:`protowire`); every tensor payload of
  at least :data:`~tensorstore.INLINE_LIMIT` bytes (``raw_data``, or external data of a >2 GB
  model) is replaced in the skeleton by a placeholder reference ``#fusenode-ref:<id>`` to an
  :class:`~tensorstore.Extent` (file, offset, length). Only the skeleton (kilobytes) is parsed
  by protobuf.
- passes read the tensors they need (:meth:`TensorStore.array`) and store replacements
  (:meth:`TensorStore.set_array`); large replacements are spilled to an unlinked temporary file,
  so memory stays at a few tensors whatever the model size (:mod:`tensorstore`).
- on save, the skeleton is serialized deterministically and walked again; every placeholder is
  spliced back as ``raw_data`` (inline model) or as external data in ``OUT.data`` (models over
  the protobuf limit, or whose input already used external data). Payloads are copied
  file-to-file by the kernel (``copy_file_range``), never through Python objects.

The output is written atomically (temporary file in the target folder, fsync, rename) and the
same input gives byte-identical output.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fusenode.passes.errors import ModelFileError, OutputError
from fusenode.passes.modelwire import Loader, Piece, Saver
from fusenode.passes.onnxproto import (
    GraphProto,
    ModelProto,
    TensorProto,
    check_model,
    check_model_file,
)
from fusenode.passes.protowire import WireError
from fusenode.passes.tensorstore import (
    Computed,
    TensorStore,
    bytes_view,
    little_endian,
    write_all,
)

if TYPE_CHECKING:
    from concurrent.futures import Future

#: A serialized protobuf message may not exceed 2 GiB; stay clear of it.
PROTOBUF_LIMIT = 2**31 - 2**24
#: Computed tensors totalling fewer bytes are computed by the writer itself, not by threads.
THREADS_FROM = 16 * 2**20
#: The key field of a StringStringEntryProto holding "location", serialized.
_LOCATION_KEY = b"\n\x08location"


# ---------------------------------------------------------------------------------------


class LazyModel:
    """An ONNX model whose large tensors stay on disk until needed. Use as a context manager."""

    def __init__(self, model: ModelProto, store: TensorStore, source: Path, external: bool):
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
            loader = Loader(path, store)
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                view = memoryview(mm)
                try:
                    skeleton = loader.model(view, source)
                except WireError as e:
                    raise ModelFileError(f"{path}: not an ONNX model or truncated ({e})") from e
                finally:
                    view.release()
            model = ModelProto()
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
        """Run onnx's checker on the skeleton, the placeholders standing for the weights.

        Catches structural errors (unsorted graph, unknown operator, bad attributes) without
        reading any weight. The verdict is that of checking the skeleton written to a file
        beside an empty stand-in file that every placeholder points at (:meth:`_check_file`).
        First, the skeleton is checked from memory: there, onnx's checker resolves external data
        against the working folder, except a location starting with ``#`` (as every placeholder
        does), which it takes as is. That check is the verdict only when it passes and the only
        external data locations in the skeleton are placeholders (the file check then passes
        too); otherwise (or for a skeleton over the protobuf limit) the file check decides and
        gives the message.
        """
        data = self.model.SerializeToString()
        placeholders = sum(
            1 for t in _all_tensors(self.model.graph) if self.store.ref_id(t) is not None
        )
        # Every "location" key of an external data entry, wherever it is, serializes as these
        # bytes: no more of them than placeholders means no other external data to look for.
        if len(data) <= PROTOBUF_LIMIT and data.count(_LOCATION_KEY) == placeholders:
            try:
                check_model(data)
                return
            except Exception:  # the file check decides, and words the message
                pass
        self._check_file(what)

    def _check_file(self, what: str | None) -> None:
        """The checker on the skeleton written to a file, placeholders pointing at an empty
        stand-in file beside it."""
        checked = ModelProto()
        checked.CopyFrom(self.model)
        for tensor in _all_tensors(checked.graph):
            if self.store.ref_id(tensor) is not None:
                tensor.external_data[0].value = "placeholder.bin"
        with tempfile.TemporaryDirectory(prefix="fusenode-check-") as tmp:
            Path(tmp, "placeholder.bin").touch()
            model_path = Path(tmp, "model.onnx")
            model_path.write_bytes(checked.SerializeToString())
            try:
                check_model_file(str(model_path))
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
        saver = Saver(self.store, data_name)
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

    def _write_pieces(self, fd: int, pieces: list[Piece]) -> None:
        """Write pieces in order; Computed values are produced on two worker threads, at most
        a few ahead of the writer, so computing overlaps writing and memory stays bounded.
        Below :data:`THREADS_FROM` computed bytes, the writer computes them itself: handing
        them to threads would cost more than it overlaps."""
        computed = [p for p in pieces if isinstance(p, Computed)]
        if sum(c.length for c in computed) < THREADS_FROM:
            self._write_in_order(fd, pieces, lambda c: little_endian(c.compute()))
            return
        from concurrent.futures import ThreadPoolExecutor

        ahead: dict[int, Future] = {}
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="fusenode-compute") as pool:
            next_submit = 0

            def refill() -> None:
                nonlocal next_submit
                while next_submit < len(computed) and len(ahead) < 3:
                    c = computed[next_submit]
                    ahead[id(c)] = pool.submit(lambda c=c: little_endian(c.compute()))
                    next_submit += 1

            def produced(piece: Computed) -> np.ndarray:
                refill()
                data = ahead.pop(id(piece)).result()
                refill()
                return data

            self._write_in_order(fd, pieces, produced)

    def _write_in_order(
        self, fd: int, pieces: list[Piece], produce: Callable[[Computed], np.ndarray]
    ) -> None:
        pending: list[bytes] = []
        for piece in pieces:
            if isinstance(piece, bytes):
                pending.append(piece)
                continue
            if pending:
                write_all(fd, b"".join(pending))
                pending.clear()
            if isinstance(piece, Computed):
                data = produce(piece)
                if data.nbytes != piece.length:
                    raise ModelFileError("computed tensor size does not match its shape")
                write_all(fd, bytes_view(data))
                del data
            else:
                self.store.write_to(piece, fd)
        if pending:
            write_all(fd, b"".join(pending))


def _all_tensors(graph: GraphProto) -> Iterator[TensorProto]:
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
