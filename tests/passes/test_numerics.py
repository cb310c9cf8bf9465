"""Weight math: float64 products rounded once, identical on the numpy and torch backends."""

from __future__ import annotations

from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest

from fusenode.passes.numerics import (
    NumpyBackend,
    TorchBackend,
    backend_for,
    float_max,
    is_bfloat16,
    is_float,
    round_to,
)
from tests.support.onnx_models import BF16


def _exact_round(x: float, dtype) -> float:
    """Correct round-to-nearest-even of x to dtype, by exhaustive neighbour comparison."""
    info = ml_dtypes.finfo(dtype)
    lo = np.array([x], np.float64).astype(np.float32)  # a nearby value of the target grid
    cand = np.array(lo, dtype=dtype)
    # walk a few neighbours either side and pick the nearest (ties to even significand)
    values = set()
    c = cand.astype(np.float64)[0]
    step = float(info.eps) * max(abs(c), float(info.tiny))
    for k in range(-4, 5):
        v = np.array([c + k * step / 2], np.float64).astype(np.float32).astype(dtype)
        values.add(float(v.astype(np.float64)[0]))
    fx = Fraction(x)
    best = min(
        values,
        key=lambda v: (abs(Fraction(v) - fx), int(np.array([v], dtype).view(np.uint16)[0]) & 1),
    )
    return best


def test_bf16_double_rounding_case():
    # 1 + 2**-8 + 2**-30 is just above the midpoint between 1 and 1 + 2**-7: it must round up.
    x = np.array([1 + 2**-8 + 2**-30])
    assert np.array(x).astype(BF16).astype(np.float64)[0] == 1.0  # the naive cast is wrong
    assert round_to(x, BF16).astype(np.float64)[0] == 1 + 2**-7


@pytest.mark.parametrize("dtype", [np.float16, BF16])
def test_round_to_matches_exact_rounding(dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(2000) * np.exp2(rng.integers(-10, 10, 2000))
    got = round_to(x, dtype).astype(np.float64)
    want = np.array([_exact_round(float(v), dtype) for v in x])
    np.testing.assert_array_equal(got, want)


def test_round_to_overflow_is_inf_without_warning():
    assert np.isinf(round_to(np.array([1e6]), np.float16)).all()


@pytest.mark.parametrize("dtype", [np.float16, BF16, np.float32, np.float64])
def test_torch_backend_bit_identical_to_numpy(dtype):
    """The CUDA path's code, run here on the CPU, gives the same bits as the numpy path."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((7, 3, 3, 3)).astype(dtype)
    factor = rng.uniform(0.1, 3.0, (7, 1, 1, 1))
    a = NumpyBackend().scale(w, factor)
    b = TorchBackend("cpu").scale(w, factor)
    assert a.dtype == b.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))
    want = round_to(w.astype(np.float64) * factor, dtype)
    np.testing.assert_array_equal(a.view(np.uint8), want.view(np.uint8))


def test_numpy_backend_chunks_cover_every_row():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((3000, 200)).astype(np.float32)  # several chunks
    factor = rng.uniform(0.5, 2, (3000, 1))
    np.testing.assert_array_equal(
        NumpyBackend().scale(w, factor), (w.astype(np.float64) * factor).astype(np.float32)
    )
    row_factor = rng.uniform(0.5, 2, (1, 200))
    np.testing.assert_array_equal(
        NumpyBackend().scale(w, row_factor), (w.astype(np.float64) * row_factor).astype(np.float32)
    )


def test_backend_for():
    assert backend_for("cpu").name == "cpu"
    with pytest.raises(ValueError):
        backend_for("tpu")


def test_float_dtypes_without_importing_ml_dtypes_for_others():
    assert is_bfloat16(BF16) and not is_bfloat16(np.float16) and not is_bfloat16(np.float32)
    assert all(is_float(d) for d in (np.float16, BF16, np.float32, np.float64))
    assert not any(is_float(d) for d in (np.int32, np.uint16, np.dtype(">f4"), np.complex64))
    assert float_max(np.float16) == 65504.0
    assert float_max(BF16) == float(ml_dtypes.finfo(ml_dtypes.bfloat16).max)
    assert float_max(np.float32) == float(np.finfo(np.float32).max)
