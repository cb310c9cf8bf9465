"""BatchNormalization after Conv.

Conv's weight is W [M, C/group, k1, ..., kn]: output channel m is computed from W[m] alone,
whatever the group count, so with s = gamma / sqrt(var + eps)::

    W'[m] = W[m] * s[m]
    b'    = (b - mean) * s + beta        (b = 0 when the Conv has no bias)

in float64, each rounded once to the storage dtype. The BatchNormalization must have M channels
and the bias, when present, must be [M].
"""

from __future__ import annotations

from fusenode.passes.fuse_bn_base import Fold, FuseBatchNormRule, Operands, bias_vector


class FuseBatchNormIntoConv(FuseBatchNormRule):
    """Conv -> BatchNormalization becomes one Conv with scaled weights and a new bias."""

    op_type = "Conv"

    def fold(self, x: Operands) -> Fold | str:
        w, b, s = x.w, x.b, x.s
        if w.ndim < 3:
            return f"Conv weight has rank {w.ndim}, expected at least 3"
        if w.shape[0] != s.shape[0]:
            return f"Conv has {w.shape[0]} output channels, BatchNormalization {s.shape[0]}"
        if b is not None and b.shape != (w.shape[0],):
            return f"Conv bias has shape {list(b.shape)}, expected [{w.shape[0]}]"
        factor = s.reshape((-1,) + (1,) * (w.ndim - 1))
        return Fold(factor, bias_vector(x, w.shape[0]))
