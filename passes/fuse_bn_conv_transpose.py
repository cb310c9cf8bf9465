"""BatchNormalization after ConvTranspose.

ConvTranspose's weight is W [C, M/group, k1, ..., kn] (input channels first). Output channel m
of group g = m // (M/group) is column j = m - g*M/group of the rows of that group,
g*C/group .. (g+1)*C/group - 1. With s = gamma / sqrt(var + eps)::

    W'[r, j] = W[r, j] * s[g(r) * M/group + j]      (g(r) = r // (C/group))
    b'       = (b - mean) * s + beta               (b = 0 when absent)

i.e. W viewed as [group, C/group, M/group, k...] times s viewed as [group, 1, M/group, 1...],
for any number of spatial dims. Computed in float64, rounded once to the storage dtype. The
BatchNormalization must have M = group * W.shape[1] channels.
"""

from __future__ import annotations

import numpy as np

from fusenode.passes.framework import attr
from fusenode.passes.fuse_bn_base import Fold, FuseBatchNormRule, Operands, bias_vector


class FuseBatchNormIntoConvTranspose(FuseBatchNormRule):
    """ConvTranspose -> BatchNormalization becomes one ConvTranspose (grouped ones too)."""

    op_type = "ConvTranspose"

    def fold(self, x: Operands) -> Fold | str:
        op, w, b, s = x.op, x.w, x.b, x.s
        group = int(attr(op, "group", 1))
        if w.ndim < 3:
            return f"ConvTranspose weight has rank {w.ndim}, expected at least 3"
        if group < 1 or w.shape[0] % group:
            return (
                f"ConvTranspose weight's {w.shape[0]} input channels do not split in {group} groups"
            )
        per_group = w.shape[1]
        channels = per_group * group
        if channels != s.shape[0]:
            return f"ConvTranspose has {channels} output channels, BatchNormalization {s.shape[0]}"
        if b is not None and b.shape != (channels,):
            return f"ConvTranspose bias has shape {list(b.shape)}, expected [{channels}]"
        # One factor row per weight row: the group's M/group factors, repeated C/group times.
        rows = np.repeat(s.reshape(group, per_group), w.shape[0] // group, axis=0)
        factor = rows.reshape(rows.shape + (1,) * (w.ndim - 2))
        return Fold(factor, bias_vector(x, channels))
