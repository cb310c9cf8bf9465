"""The two walks over a serialized model that keep large tensors out of protobuf.

- :class:`Loader` (file -> skeleton): walks the input with :mod:`protowire`; every tensor
  payload of at least :data:`~tensorstore.INLINE_LIMIT` bytes (``raw_data``, or external data)
  becomes a placeholder reference to an :class:`~tensorstore.Extent` of the file.
- :class:`Saver` (skeleton -> file): walks the serialized skeleton and splices every
  placeholder back as ``raw_data``, or as external data in ``OUT.data`` (page-aligned).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from fusenode.passes.errors import ModelFileError
from fusenode.passes.onnxproto import TensorProto
from fusenode.passes.protowire import LEN, VARINT, encode_key, encode_varint, iter_fields
from fusenode.passes.tensorstore import INLINE_LIMIT, REF, Computed, Extent, TensorStore, set_ref

#: Alignment of tensors in an external data file (page size: lets runtimes mmap them).
EXTERNAL_ALIGN = 4096
_REF_BYTES = REF.encode()

# onnx.proto field numbers used by the walker.
_MODEL_GRAPH = 7
_GRAPH_NODE, _GRAPH_INITIALIZER = 1, 5
_NODE_ATTRIBUTE = 5
_ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS = 5, 6, 10, 11
_T_DIMS, _T_NAME, _T_RAW, _T_EXTERNAL, _T_LOCATION = 1, 8, 9, 13, 14


# ---------------------------------------------------------------------------------------
# Loading: file -> skeleton + extents


class Loader:
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
        set_ref(t, self.store.reference(extent))
        keep.append(t.SerializeToString())
        return b"".join(keep)

    def _no_symlinks(self, location: str, rel: Path) -> Path:
        """The external data file ``rel`` under the model's folder, refused (as onnx refuses
        it) when it or a folder on the way is a symbolic link, or it is not a regular file:
        a model received from the network must not make the reader open files elsewhere."""
        path = self.base
        for part in rel.parts:
            path = path / part
            try:
                mode = os.lstat(path).st_mode
            except OSError as e:
                raise ModelFileError(f"cannot open external data {location}: {e.strerror}") from e
            if stat.S_ISLNK(mode):
                raise ModelFileError(
                    f"external data {location} is a symbolic link ({path.name}): refused"
                )
        if not stat.S_ISREG(mode):
            raise ModelFileError(f"external data {location} is not a regular file")
        return path.resolve()

    def _external_extent(self, entries: dict[str, str]) -> Extent:
        location = entries.get("location", "")
        rel = Path(location)
        if not location or rel.is_absolute() or ".." in rel.parts:
            raise ModelFileError(f"external data location {location!r} is not a relative path")
        path = self._no_symlinks(location, rel)
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

Piece = bytes | Extent | Computed


class Saver:
    """Turns the serialized skeleton into pieces (bytes or extents) of the output file(s).

    The skeleton comes from protobuf's serializer, so every field is in its shortest encoding:
    a field with no placeholder below it (the bytes of :data:`~tensorstore.REF` do not occur in
    it) is copied as it is, without walking it, and fields copied as they are in a row make one
    piece.
    """

    def __init__(self, store: TensorStore, data_name: str | None) -> None:
        self.store = store
        self.data_name = data_name  # None: inline everything
        self.data_pieces: list[Piece] = []
        self.data_size = 0

    def model(self, buf: bytes) -> tuple[list[Piece], int]:
        self._skeleton = buf
        return self._message(memoryview(buf), 0, len(buf), self._model_field)

    def _message(self, buf, start, end, on_field) -> tuple[list[Piece], int]:
        pieces: list[Piece] = []
        size = 0
        copied = start  # where the run of fields copied as they are began
        for field, wt, fs, vs, ve in iter_fields(buf, start, end):
            if wt != LEN or self._skeleton.find(_REF_BYTES, vs, ve) < 0:
                continue
            child = on_field(buf, field, vs, ve)
            if child is None:
                continue
            if copied < fs:
                pieces.append(bytes(buf[copied:fs]))
                size += fs - copied
            sub, sub_size = child
            head = encode_key(field, LEN) + encode_varint(sub_size)
            pieces.append(head)
            pieces.extend(sub)
            size += len(head) + sub_size
            copied = ve
        if copied < end:
            pieces.append(bytes(buf[copied:end]))
            size += end - copied
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
