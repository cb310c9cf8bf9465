"""The ONNX protobuf classes, checker and helpers passes/ uses, without ``import onnx``.

The only place passes/ gets ONNX's message classes (:data:`ModelProto`, :data:`TensorProto`,
...), its model checker (:func:`check_model`, :func:`check_model_file`) and the few helpers a
pass needs (dtype tables, a small tensor as an array, attributes) from.

Why: ``import onnx`` runs ``onnx/__init__``, which imports onnx.compose, onnx.helper,
google.protobuf.json_format, importlib.metadata, ml_dtypes and more: ~100 ms on top of numpy,
more than the whole fusion of a small model. A pass needs two pieces of the distribution: the
generated protobuf module (~30 ms, most of it protobuf's own import) and the C++ extension
that holds the checker (~4 ms).

The fast path, taken when ``onnx`` is not imported yet:

1. the C++ extension ``onnx/onnx_cpp2py_export*.so`` is located with importlib (which runs
   nothing) and loaded under its real name, ``onnx.onnx_cpp2py_export``, into sys.modules: a
   nanobind extension loads once per process (a second load fails), so a later
   ``import onnx`` must find this one and reuse it;
2. the generated module ``onnx/onnx_ml_pb2.py`` runs from its file under a private name
   (``_fusenode_onnx_ml_pb2``), without the onnx package. A later ``import onnx`` gets the very
   same classes: the descriptor pool takes the identical file again, and protobuf keeps one
   message class per descriptor.

It relies on: onnx's layout (both files beside ``onnx/__init__.py``), the extension's
``ONNX_ML`` flag (set: onnx uses onnx_ml_pb2, not onnx_pb2), its
``checker.check_model(bytes, full_check, skip_opset_compatibility_check,
check_custom_domain)`` and ``checker.check_model_path(path, ...)`` (what onnx 1.23's
``onnx.checker.check_model`` calls), and protobuf's class per descriptor (verified for its
"upb" and "python" backends).

Fallback: when ``onnx`` is already imported, or any step above is missing or fails, this
module imports onnx and takes everything from it (the same classes, the same checker). A
checker call the extension refuses with a TypeError (another signature) goes through
``onnx.checker``. The helpers handle what a pass meets (numeric tensors, stored raw or in their
typed field; scalar and list attributes) and hand anything else to onnx's own ``helper`` and
``numpy_helper``; bfloat16 brings in ml_dtypes only when one is met.

A later ``import onnx`` works and shares the classes and the extension; only the attribute
``onnx.onnx_cpp2py_export`` is then missing on the package (onnx's own code imports the
extension's submodules by name and does not read it). Code that wants the whole package calls
:func:`full_onnx`, which imports it and sets that attribute back.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from types import ModuleType
from typing import Any

import numpy as np

_EXTENSION = "onnx.onnx_cpp2py_export"
_PRIVATE_PB2 = "_fusenode_onnx_ml_pb2"
#: Protobuf backends known to keep one class per message descriptor.
_ONE_CLASS_PER_DESCRIPTOR = ("upb", "python")
_MESSAGES = (
    "ModelProto",
    "GraphProto",
    "NodeProto",
    "TensorProto",
    "AttributeProto",
    "ValueInfoProto",
)


def full_onnx() -> ModuleType:
    """The onnx package (imported on first call), with ``onnx.onnx_cpp2py_export`` set."""
    import onnx

    extension = sys.modules.get(_EXTENSION)
    if extension is not None and getattr(onnx, "onnx_cpp2py_export", None) is not extension:
        onnx.onnx_cpp2py_export = extension
    return onnx


def _load_without_onnx() -> tuple[ModuleType, ModuleType]:
    """(generated module, C++ extension), loaded from onnx's files; raises on anything amiss."""
    from google.protobuf.internal import api_implementation

    if api_implementation.Type() not in _ONE_CLASS_PER_DESCRIPTOR:
        raise ImportError(f"protobuf backend {api_implementation.Type()!r}")
    onnx_spec = importlib.util.find_spec("onnx")  # finds the package without running it
    if onnx_spec is None or not onnx_spec.submodule_search_locations:
        raise ImportError("onnx is not an installed package")
    where = list(onnx_spec.submodule_search_locations)
    extension = sys.modules.get(_EXTENSION)
    if extension is None:
        spec = importlib.machinery.PathFinder.find_spec(_EXTENSION, where)
        if spec is None or not isinstance(spec.loader, importlib.machinery.ExtensionFileLoader):
            raise ImportError(f"no {_EXTENSION} extension")
        extension = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(extension)
        sys.modules[_EXTENSION] = extension
    checker = extension.checker
    if not (extension.ONNX_ML and callable(checker.check_model)):
        raise ImportError("onnx built without ONNX-ML, or without its checker")
    if not callable(checker.check_model_path):
        raise ImportError("the checker has no check_model_path")
    found = importlib.machinery.PathFinder.find_spec("onnx.onnx_ml_pb2", where)
    if found is None or not found.has_location or not found.origin:
        raise ImportError("no onnx/onnx_ml_pb2.py")
    spec = importlib.util.spec_from_file_location(_PRIVATE_PB2, found.origin)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {found.origin}")
    pb2 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pb2)
    for name in _MESSAGES:
        if getattr(pb2, name).DESCRIPTOR.full_name != f"onnx.{name}":
            raise ImportError(f"onnx_ml_pb2.{name} is not onnx.{name}")
    return pb2, extension


def _load() -> tuple[ModuleType, Any]:
    """(where the message classes come from, the extension's checker or None for onnx's)."""
    if "onnx" not in sys.modules:
        try:
            pb2, extension = _load_without_onnx()
            return pb2, extension.checker
        except Exception:  # anything amiss: onnx itself, as if this module were not here
            pass
    return full_onnx(), None


_protos, _checker = _load()
#: Whether the fast path is in use (False: the classes and the checker come from ``onnx``).
WITHOUT_ONNX_PACKAGE = _checker is not None

ModelProto = _protos.ModelProto
GraphProto = _protos.GraphProto
NodeProto = _protos.NodeProto
TensorProto = _protos.TensorProto
AttributeProto = _protos.AttributeProto
ValueInfoProto = _protos.ValueInfoProto
#: What the checker raises for an invalid model: ``onnx.checker.ValidationError``.
ValidationError = (_checker or full_onnx().checker).ValidationError


# -- the checker ------------------------------------------------------------------------------
def check_model(model: bytes) -> None:
    """``onnx.checker.check_model(model)`` for a serialized model (default flags)."""
    if _checker is not None:
        try:
            _checker.check_model(model, False, False, False)
            return
        except TypeError:  # not the signature relied on: onnx.checker knows its own
            pass
    full_onnx().checker.check_model(model)


def check_model_file(path: str) -> None:
    """``onnx.checker.check_model(path)``: external data is looked for beside ``path``."""
    if _checker is not None:
        try:
            _checker.check_model_path(path, False, False, False)
            return
        except TypeError:
            pass
    full_onnx().checker.check_model(path)


# -- dtypes (onnx/_mapping.py's table) ---------------------------------------------------------
_T = TensorProto
_NUMPY_DTYPES: dict[int, np.dtype] = {
    code: np.dtype(name)
    for code, name in (
        (_T.FLOAT, "float32"),
        (_T.UINT8, "uint8"),
        (_T.INT8, "int8"),
        (_T.UINT16, "uint16"),
        (_T.INT16, "int16"),
        (_T.INT32, "int32"),
        (_T.INT64, "int64"),
        (_T.STRING, "object"),
        (_T.BOOL, "bool"),
        (_T.FLOAT16, "float16"),
        (_T.DOUBLE, "float64"),
        (_T.UINT32, "uint32"),
        (_T.UINT64, "uint64"),
        (_T.COMPLEX64, "complex64"),
        (_T.COMPLEX128, "complex128"),
    )
}
_TENSOR_DTYPES = {dtype: code for code, dtype in _NUMPY_DTYPES.items()}


def tensor_dtype_to_np_dtype(data_type: int) -> np.dtype:
    """``onnx.helper.tensor_dtype_to_np_dtype``: the numpy dtype of a TensorProto data type."""
    dtype = _NUMPY_DTYPES.get(data_type)
    if dtype is not None:
        return dtype
    if data_type == _T.BFLOAT16:
        from fusenode.passes.numerics import bfloat16

        return bfloat16()
    return np.dtype(full_onnx().helper.tensor_dtype_to_np_dtype(data_type))


def np_dtype_to_tensor_dtype(dtype: np.dtype) -> int:
    """``onnx.helper.np_dtype_to_tensor_dtype``: the TensorProto data type of a numpy dtype."""
    code = _TENSOR_DTYPES.get(dtype)
    if code is not None:
        return code
    from fusenode.passes.numerics import is_bfloat16

    if isinstance(dtype, np.dtype) and is_bfloat16(dtype):
        return _T.BFLOAT16
    return int(full_onnx().helper.np_dtype_to_tensor_dtype(dtype))


# -- tensors and attributes ---------------------------------------------------------------------
#: Typed fields read here as onnx's numpy_helper reads them: data type -> (field, storage dtype).
_TYPED_FIELDS = {
    _T.FLOAT: ("float_data", np.dtype("float32")),
    _T.DOUBLE: ("double_data", np.dtype("float64")),
    _T.INT32: ("int32_data", np.dtype("int32")),
    _T.INT64: ("int64_data", np.dtype("int64")),
}
#: 16-bit types stored one per int32_data entry.
_HALF_WORDS = (_T.FLOAT16, _T.BFLOAT16, _T.INT16, _T.UINT16)
_LITTLE_ENDIAN = sys.byteorder == "little"


def to_array(tensor: Any) -> np.ndarray:
    """``onnx.numpy_helper.to_array`` for a tensor held in the message (not external data)."""
    try:
        array = _to_array(tensor)
    except Exception:  # onnx's own function raises its own error (or reads what this cannot)
        array = None
    if array is None:
        return full_onnx().numpy_helper.to_array(tensor)
    return array


def _to_array(tensor: Any) -> np.ndarray | None:
    """The array, or None when this is a case for onnx's numpy_helper."""
    code = tensor.data_type
    if (
        tensor.HasField("segment")
        or tensor.data_location == _T.EXTERNAL
        or (code not in _NUMPY_DTYPES and code != _T.BFLOAT16)
        or code == _T.STRING
    ):
        return None
    dtype = tensor_dtype_to_np_dtype(code)
    dims = tensor.dims
    if tensor.HasField("raw_data"):
        if not _LITTLE_ENDIAN:
            return None
        return np.frombuffer(tensor.raw_data, dtype=dtype).reshape(dims)
    if code in _HALF_WORDS:
        words = np.array(tensor.int32_data, dtype=np.int32).view(np.uint32)
        return words.astype(np.uint16).reshape(dims).view(dtype)
    if code not in _TYPED_FIELDS:
        return None
    field, storage = _TYPED_FIELDS[code]
    return np.asarray(getattr(tensor, field), dtype=storage).astype(dtype).reshape(dims)


_A = AttributeProto
_ATTRIBUTE_VALUES = {
    _A.FLOAT: lambda a: a.f,
    _A.INT: lambda a: a.i,
    _A.STRING: lambda a: a.s,
    _A.FLOATS: lambda a: list(a.floats),
    _A.INTS: lambda a: list(a.ints),
    _A.UNDEFINED: lambda a: None,
}


def get_attribute_value(attribute: Any) -> Any:
    """``onnx.helper.get_attribute_value``."""
    value = _ATTRIBUTE_VALUES.get(attribute.type)
    if value is None or attribute.ref_attr_name:
        return full_onnx().helper.get_attribute_value(attribute)
    return value(attribute)


def make_float_attribute(name: str, value: float) -> Any:
    """``onnx.helper.make_attribute(name, value)`` for a float ``value``."""
    attribute = AttributeProto()
    attribute.name = name
    attribute.f = float(value)
    attribute.type = _A.FLOAT
    return attribute


def make_int_attribute(name: str, value: int) -> Any:
    """``onnx.helper.make_attribute(name, value)`` for an int ``value``."""
    attribute = AttributeProto()
    attribute.name = name
    attribute.i = int(value)
    attribute.type = _A.INT
    return attribute


def make_tensor_value_info(name: str, elem_type: int, shape: list[int]) -> Any:
    """``onnx.helper.make_tensor_value_info(name, elem_type, shape)`` for a static shape."""
    info = ValueInfoProto()
    info.name = name
    tensor_type = info.type.tensor_type
    tensor_type.elem_type = elem_type
    tensor_type.shape.SetInParent()  # present even when empty: a scalar, not an unknown rank
    for d in shape:
        tensor_type.shape.dim.add().dim_value = d
    return info
