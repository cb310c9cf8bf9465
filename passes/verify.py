"""Prove an optimized model computes what the original computes.

Both models run on the same generated inputs under onnxruntime with its own graph
optimizations off (ORT_DISABLE_ALL), so ORT cannot fold anything itself and hide a difference.
Where onnxruntime has no CPU kernel for the model (float64 or bfloat16 convolutions), the ONNX
reference evaluator (``onnx.reference``) runs both instead; the result says which engine ran.

Outputs pass when ``|a - b| <= atol + rtol * |b|`` everywhere (``b`` the original's), NaN
positions equal, non-float outputs exactly equal. Tolerances follow the lowest-precision float
output dtype (see :data:`TOLERANCES`) unless given.

For a float16 or bfloat16 output the absolute tolerance is scaled to the output's magnitude:
``atol * max(1, rms(b))``. Both models round every product and partial sum to 8 or 11 bits,
so their difference at an element is bounded by the size of the terms summed there, not by
the (possibly cancelled, near-zero) result; the output's RMS estimates that size. A fold that
is wrong changes outputs by a fraction of their own size, far above a few 16-bit ulps of it
(docs/design.md section 13). float32 and float64 are judged unscaled.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fusenode.passes.errors import VerificationError
from fusenode.passes.numerics import bfloat16, is_bfloat16
from fusenode.passes.onnxproto import full_onnx, tensor_dtype_to_np_dtype

#: (rtol, atol) per output dtype. float32/float64: the tolerances of the ONNX tools' own fusion
#: tests. float16 (11-bit significand) and bfloat16 (8-bit) round the fused weights and every
#: intermediate: relative errors of a few ulps of the storage type are expected.
TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-4, 1e-5),
    "float32": (1e-4, 1e-5),
    "float16": (1e-2, 1e-2),
    "bfloat16": (5e-2, 5e-2),
}
_PRECISION_ORDER = ["bfloat16", "float16", "float32", "float64"]
#: Output dtypes whose absolute tolerance scales with the output's RMS.
_SCALED = frozenset({"bfloat16", "float16"})
#: Stand-in for symbolic dimensions: the first (batch) dimension, then the others.
DEFAULT_BATCH = 1
DEFAULT_DIM = 32


@dataclass
class OutputCheck:
    name: str
    dtype: str
    shape: list[int]
    max_abs_error: float
    max_rel_error: float
    ok: bool
    #: The absolute tolerance this output was judged by (16-bit: scaled to its RMS).
    atol: float | None = None


@dataclass
class VerifyResult:
    engine: str
    rtol: float
    atol: float
    max_abs_error: float
    max_rel_error: float
    outputs: list[OutputCheck]
    ok: bool
    #: How the inputs were made: `make_inputs` with this seed, at these shapes (name -> dims),
    #: so anyone can run the same check again (`fusenode verify --recheck`).
    seed: int = 0
    inputs: dict[str, list[int]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Runner:
    """Runs a model file on onnxruntime (optimizations off), or the reference evaluator."""

    def __init__(self, path: Path, engine: str | None = None) -> None:
        self.path = path
        self.engine = engine or "onnxruntime"
        if self.engine == "onnxruntime":
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            so.log_severity_level = 3
            self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            self.inputs = [(i.name, i.type, i.shape) for i in self.session.get_inputs()]
            self.output_names = [o.name for o in self.session.get_outputs()]
        else:
            onnx = full_onnx()
            from onnx.reference import ReferenceEvaluator

            model = onnx.load(str(path))
            init = {t.name for t in model.graph.initializer}
            self.inputs = []
            for vi in model.graph.input:
                if vi.name in init:
                    continue
                tt = vi.type.tensor_type
                dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
                self.inputs.append((vi.name, tt.elem_type, dims))
            self.output_names = [o.name for o in model.graph.output]
            self.session = ReferenceEvaluator(model)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [np.asarray(x) for x in self.session.run(None, feeds)]


def _ort_type_to_dtype(t: Any) -> np.dtype:
    if isinstance(t, int):  # reference path: ONNX TensorProto enum
        return np.dtype(tensor_dtype_to_np_dtype(t))
    names = {
        "tensor(float)": np.float32,
        "tensor(double)": np.float64,
        "tensor(float16)": np.float16,
        "tensor(int64)": np.int64,
        "tensor(int32)": np.int32,
        "tensor(int16)": np.int16,
        "tensor(int8)": np.int8,
        "tensor(uint8)": np.uint8,
        "tensor(bool)": np.bool_,
    }
    if t == "tensor(bfloat16)":  # ml_dtypes is imported only for a model that needs it
        return bfloat16()
    if t not in names:
        raise VerificationError(f"cannot generate an input of type {t}")
    return np.dtype(names[t])


def make_inputs(
    inputs: list[tuple[str, Any, list[Any]]],
    shapes: dict[str, list[int]] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Seeded inputs: standard normal floats, small non-negative integers, random booleans."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, typ, dims in inputs:
        dtype = _ort_type_to_dtype(typ)
        if shapes and name in shapes:
            shape = list(shapes[name])
        else:
            shape = [
                d if isinstance(d, int) and d > 0 else (DEFAULT_BATCH if i == 0 else DEFAULT_DIM)
                for i, d in enumerate(dims or [])
            ]
        if dtype.kind == "f" or is_bfloat16(dtype):
            feeds[name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[name] = rng.integers(0, 2, shape).astype(np.bool_)
        else:
            feeds[name] = rng.integers(0, 4, shape).astype(dtype)
    return feeds


def _tolerance_for(dtypes: list[np.dtype]) -> tuple[float, float]:
    names = [np.dtype(d).name for d in dtypes if np.dtype(d).name in TOLERANCES]
    if not names:
        return TOLERANCES["float32"]
    lowest = min(names, key=_PRECISION_ORDER.index)
    return TOLERANCES[lowest]


def _open_pair(original: Path, optimized: Path) -> tuple[_Runner, _Runner]:
    try:
        return _Runner(original), _Runner(optimized)
    except Exception as ort_error:  # no kernel for the dtype, or an opset ORT lacks
        try:
            return _Runner(original, "onnx-reference"), _Runner(optimized, "onnx-reference")
        except Exception as ref_error:
            raise VerificationError(
                f"cannot run the models to verify them: onnxruntime: {_first_line(ort_error)}; "
                f"onnx reference evaluator: {_first_line(ref_error)}"
            ) from ref_error


def verify(
    original: Path,
    optimized: Path,
    *,
    shapes: dict[str, list[int]] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    seed: int = 0,
    at_most_default: bool = False,
) -> VerifyResult:
    """``at_most_default``: ``rtol``/``atol`` may only tighten the dtype's defaults (a recheck
    judges by this node's tolerances, whatever a signer wrote)."""
    a, b = _open_pair(Path(original), Path(optimized))
    feeds = make_inputs(a.inputs, shapes, seed)
    try:
        want = a.run(feeds)
    except Exception as e:
        raise VerificationError(f"the original model fails to run: {_first_line(e)}") from e
    try:
        got = b.run(feeds)
    except Exception as e:
        raise VerificationError(f"the optimized model fails to run: {_first_line(e)}") from e
    if len(want) != len(got):
        raise VerificationError(f"output count changed: {len(want)} -> {len(got)}")
    default_rtol, default_atol = _tolerance_for([w.dtype for w in want])
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol
    if at_most_default:
        rtol, atol = min(rtol, default_rtol), min(atol, default_atol)
    checks = [
        _compare(name, w, g, rtol, atol)
        for name, w, g in zip(a.output_names, want, got, strict=True)
    ]
    return VerifyResult(
        engine=a.engine,
        rtol=rtol,
        atol=atol,
        max_abs_error=max((c.max_abs_error for c in checks), default=0.0),
        max_rel_error=max((c.max_rel_error for c in checks), default=0.0),
        outputs=checks,
        ok=all(c.ok for c in checks),
        seed=seed,
        inputs={name: [int(d) for d in value.shape] for name, value in feeds.items()},
    )


def _compare(name: str, want: np.ndarray, got: np.ndarray, rtol: float, atol: float) -> OutputCheck:
    shape = list(want.shape)
    if want.shape != got.shape or want.dtype != got.dtype:
        return OutputCheck(name, str(want.dtype), shape, float("inf"), float("inf"), False)
    is_float = want.dtype.kind == "f" or is_bfloat16(want.dtype)
    if not is_float:
        equal = bool(np.array_equal(want, got))
        err = 0.0 if equal else float("inf")
        return OutputCheck(name, str(want.dtype), shape, err, err, equal)
    w = want.astype(np.float64)
    g = got.astype(np.float64)
    nan_w, nan_g = np.isnan(w), np.isnan(g)
    same_nan = bool(np.array_equal(nan_w, nan_g))
    finite = ~nan_w & ~nan_g
    with np.errstate(invalid="ignore"):
        diff = np.where(finite, np.abs(w - g), 0.0)
        diff = np.where(np.isinf(w) & (w == g), 0.0, diff)  # equal infinities
    max_abs = float(diff.max()) if diff.size else 0.0
    mag = np.abs(w)
    if want.dtype.name in _SCALED:  # 16-bit: atol in units of the output's own size
        real = np.isfinite(w)
        rms = float(np.sqrt(np.mean(np.square(w[real])))) if real.any() else 0.0
        atol = atol * max(1.0, rms)
    big = finite & (mag > atol)
    max_rel = float((diff[big] / mag[big]).max()) if big.any() else 0.0
    ok = same_nan and bool((diff <= atol + rtol * np.where(finite, mag, 0.0)).all())
    if np.isnan(max_abs):
        ok = False
    return OutputCheck(name, str(want.dtype), shape, max_abs, max_rel, ok, atol)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__
