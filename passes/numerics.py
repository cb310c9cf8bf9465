"""Weight math for folds: float64 arithmetic, rounded once to the storage dtype.

Two backends compute ``round(weight * factor)`` (weight in its storage dtype, factor float64,
broadcast along the leading axis):

- :class:`NumpyBackend` (CPU): cache-sized chunks, no full float64 copy of a weight. Chosen on
  the CPU because ``import torch`` alone costs ~2 s and ~220 MB, more than the math itself.
- :class:`TorchBackend` (CUDA): the same math in torch on the GPU.

Rounding once: float64 -> float32 and float64 -> float16 casts are correctly rounded in numpy,
but float64 -> bfloat16 (ml_dtypes and torch alike) goes through float32, rounding twice (1 +
2**-8 + 2**-30 becomes 1.0 instead of 1 + 2**-7). We first round to float32 *to odd* (truncate,
then set the last bit if inexact) and then to the target: with float32's 24 bits, at least two
more than bfloat16's or float16's 8 and 11, this gives the correctly rounded result.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Protocol

import numpy as np

#: The storage dtypes a fold keeps are these and bfloat16, ml_dtypes' numpy type: ml_dtypes is
#: imported only when a bfloat16 tensor is met (see :func:`is_bfloat16`), not by every run.
_NUMPY_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
#: Elements per chunk: 256 Ki float64 = 2 MiB, which stays in cache.
_CHUNK_ELEMENTS = 1 << 18


@functools.cache
def bfloat16() -> np.dtype:
    """ml_dtypes' bfloat16 as a numpy dtype (imports ml_dtypes on first use)."""
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


def is_bfloat16(dtype: np.dtype) -> bool:
    """Whether ``dtype`` is ml_dtypes' bfloat16.

    Kind and name are tested first: a bfloat16 array only exists once ml_dtypes is loaded, so
    for every other dtype the answer costs no import (and the kind test, no Python call).
    """
    d = np.dtype(dtype)
    return d.kind == "V" and d.name == "bfloat16" and d == bfloat16()


def is_float(dtype: np.dtype) -> bool:
    """Whether ``dtype`` is a storage dtype a fold keeps: float16/32/64 (native byte order, as
    tensors are read) or bfloat16."""
    d = np.dtype(dtype)
    return d in _NUMPY_FLOATS or is_bfloat16(d)


def float_max(dtype: np.dtype) -> float:
    """The largest finite value of a float storage dtype."""
    if is_bfloat16(dtype):
        import ml_dtypes

        return float(ml_dtypes.finfo(dtype).max)
    return float(np.finfo(dtype).max)


def round_to(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Round float64 ``x`` to ``dtype`` once (round to nearest, ties to even)."""
    dtype = np.dtype(dtype)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow -> inf, checked by callers
        if dtype == np.float64:
            return x.astype(np.float64, copy=True)
        if dtype in (np.float32, np.float16):
            return x.astype(dtype)
        if is_bfloat16(dtype):
            return _to_float32_odd(x).astype(dtype)
    raise TypeError(f"unsupported storage dtype {dtype}")


def _to_float32_odd(x: np.ndarray) -> np.ndarray:
    f = x.astype(np.float32)
    with np.errstate(invalid="ignore"):
        away = np.abs(f.astype(np.float64)) > np.abs(x)  # rounded away from zero: step back
    if away.any():
        f[away] = np.nextafter(f[away], np.float32(0))
    inexact = f.astype(np.float64) != x
    bits = f.view(np.uint32)
    bits[inexact & np.isfinite(x)] |= 1
    return f


class Backend(Protocol):
    name: str

    def scale(self, weight: np.ndarray, factor: np.ndarray) -> np.ndarray:
        """``round_to(weight * factor)`` in weight's dtype; ``factor`` is float64 and broadcasts
        to ``weight`` with a leading axis of 1 or ``weight.shape[0]``."""
        ...


class NumpyBackend:
    name = "cpu"

    def scale(self, weight: np.ndarray, factor: np.ndarray) -> np.ndarray:
        _check_factor(weight, factor)
        out = np.empty(weight.shape, weight.dtype)
        if weight.size == 0:
            return out
        rows = weight.shape[0]
        per_row = max(1, weight.size // rows)
        step = max(1, _CHUNK_ELEMENTS // per_row)
        tmp = np.empty((min(step, rows), *weight.shape[1:]), np.float64)
        direct = not is_bfloat16(weight.dtype)  # numpy casts f64 -> f16/f32 with one rounding
        with np.errstate(over="ignore", invalid="ignore"):  # overflow -> inf, checked by caller
            self._scale_chunks(weight, factor, out, tmp, step, direct)
        return out

    @staticmethod
    def _scale_chunks(weight, factor, out, tmp, step, direct) -> None:
        rows = weight.shape[0]
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            t = tmp[: r1 - r0]
            f = factor[r0:r1] if factor.shape[0] == rows else factor
            np.multiply(weight[r0:r1], f, out=t, dtype=np.float64)
            if direct:
                out[r0:r1] = t
            else:
                out[r0:r1] = round_to(t, weight.dtype)


class TorchBackend:
    """The same math in torch, on ``device`` ("cuda" in production; "cpu" in tests)."""

    def __init__(self, device: str = "cuda") -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.name = device

    def scale(self, weight: np.ndarray, factor: np.ndarray) -> np.ndarray:
        torch = self.torch
        _check_factor(weight, factor)
        if not weight.flags.writeable:  # a view of the mapped model file; torch wants writable
            weight = weight.copy()
        if not factor.flags.writeable:  # a fold's plan is read-only
            factor = factor.copy()
        bf16 = is_bfloat16(weight.dtype)
        if bf16:
            w = torch.from_numpy(np.ascontiguousarray(weight).view(np.int16)).view(torch.bfloat16)
        else:
            w = torch.from_numpy(np.ascontiguousarray(weight))
        w = w.to(self.device, non_blocking=True)
        f = torch.from_numpy(np.ascontiguousarray(factor)).to(self.device)
        x = w.to(torch.float64) * f
        if weight.dtype == np.float64:
            r = x
        elif weight.dtype == np.float32:
            r = x.to(torch.float32)
        else:
            odd = self._float32_odd(x)
            r = odd.to(torch.float16 if weight.dtype == np.float16 else torch.bfloat16)
        r = r.cpu()
        if bf16:
            return r.view(torch.int16).numpy().view(weight.dtype)
        return r.numpy()

    def _float32_odd(self, x):
        torch = self.torch
        f = x.to(torch.float32)
        away = f.to(torch.float64).abs() > x.abs()
        f = torch.where(away, torch.nextafter(f, torch.zeros_like(f)), f)
        inexact = (f.to(torch.float64) != x) & torch.isfinite(x)
        bits = f.view(torch.int32)
        return torch.where(inexact, bits | 1, bits).view(torch.float32)


def _check_factor(weight: np.ndarray, factor: np.ndarray) -> None:
    if not is_float(weight.dtype):
        raise TypeError(f"unsupported storage dtype {weight.dtype}")
    if factor.dtype != np.float64 or factor.ndim != weight.ndim:
        raise TypeError("factor must be float64 with the weight's rank")
    if factor.shape[0] not in (1, weight.shape[0]):
        raise ValueError(f"factor leading axis {factor.shape[0]} vs weight {weight.shape[0]}")


@functools.cache
def cuda_available() -> bool:
    """Whether CUDA can be used, without importing torch on machines with no NVIDIA driver."""
    if not (Path("/proc/driver/nvidia/version").exists() or os.environ.get("CUDA_VISIBLE_DEVICES")):
        return False
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def backend_for(device: str) -> Backend:
    """``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda``."""
    if device == "auto":
        device = "cuda" if cuda_available() else "cpu"
    if device == "cpu":
        return NumpyBackend()
    if device == "cuda":
        if not cuda_available():
            raise RuntimeError("--device cuda: no CUDA device is available (torch sees none)")
        return TorchBackend("cuda")
    raise ValueError(f"unknown device {device!r} (auto, cpu or cuda)")
