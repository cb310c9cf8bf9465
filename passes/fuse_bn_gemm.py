"""BatchNormalization after Gemm.

Gemm computes Y = alpha * op(A) * op(B) + beta_g * C with Y [M, N]; the BatchNormalization's
channel axis is N. With s = gamma / sqrt(var + eps)::

    B'[:, n] = B[:, n] * s[n]    (transB = 0: B is [K, N])
    B'[n, :] = B[n, :] * s[n]    (transB = 1: B is [N, K])
    C'       = s * (beta_g * C - mean) + beta,   then beta_g = 1

alpha and transA are unchanged. C (a scalar, [1], [N], [1, N], [M, 1] or [M, N]; 0 when
absent) broadcasts against [N]: C' is [N] for an absent, scalar or 1-D C and 2-D for a 2-D C.
Computed in float64, rounded once to the storage dtype. Before opset 7, a C without
broadcast=1 must be [M, N].
"""

from __future__ import annotations

import numpy as np

from fusenode.passes.framework import attr
from fusenode.passes.fuse_bn_base import Fold, FuseBatchNormRule, Operands
from fusenode.passes.numerics import round_to
from fusenode.passes.onnxproto import NodeProto, make_float_attribute


class FuseBatchNormIntoGemm(FuseBatchNormRule):
    """Gemm -> BatchNormalization becomes one Gemm with scaled B, a new C and beta = 1."""

    op_type = "Gemm"
    bias_name = "C"

    def fold(self, x: Operands) -> Fold | str:
        op, w, c, s = x.op, x.w, x.b, x.s
        if w.ndim != 2:
            return f"Gemm B has rank {w.ndim}, expected 2"
        trans_b = int(attr(op, "transB", 0))
        n = w.shape[0] if trans_b else w.shape[1]
        if n != s.shape[0]:
            return f"Gemm has {n} output columns, BatchNormalization {s.shape[0]} channels"
        beta_g = float(attr(op, "beta", 1.0))
        if c is not None:
            if c.ndim > 2 or (c.ndim >= 1 and c.shape[-1] not in (1, n)):
                return f"Gemm C of shape {list(c.shape)} does not broadcast along N={n}"
            if x.opset < 7 and not attr(op, "broadcast", 0) and c.ndim != 2:
                return "Gemm (opset < 7, broadcast=0) has a C that is not [M, N]"
            base = beta_g * c.astype(np.float64)
        else:
            base = np.zeros(n)
        new_c = round_to(s * (base - x.mean) + x.beta, w.dtype)
        factor = s.reshape(n, 1) if trans_b else s.reshape(1, n)
        return Fold(factor, new_c)

    def rewrite_attributes(self, op: NodeProto) -> None:
        # beta_g is folded into C'.
        for a in op.attribute:
            if a.name == "beta":
                a.f = 1.0
                return
        op.attribute.append(make_float_attribute("beta", 1.0))
