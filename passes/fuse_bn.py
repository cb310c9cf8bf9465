"""Fold inference-mode BatchNormalization into the linear op before or after it.

BatchNormalization in inference form is a per-channel affine map::

    y = s * x + t,   s = gamma / sqrt(var + eps),   t = beta - mean * s

When it is the only consumer of a linear op's output and normalizes that op's output channels,
it folds into the op's constants (all math in float64, rounded once to the storage dtype); when
a Conv alone reads its output, it folds into that Conv's input side where that is exact.

The pass is the rule set :data:`RULES`, one rule per pattern, each module with its math:

- :class:`~fusenode.passes.fuse_bn_conv.FuseBatchNormIntoConv` (Conv -> BN)
- :class:`~fusenode.passes.fuse_bn_conv_transpose.FuseBatchNormIntoConvTranspose`
- :class:`~fusenode.passes.fuse_bn_gemm.FuseBatchNormIntoGemm`
- :class:`~fusenode.passes.fuse_bn_matmul.FuseBatchNormIntoMatMul` (MatMul [-> Add] -> BN)
- :class:`~fusenode.passes.fuse_bn_before_conv.FuseBatchNormIntoNextConv` (BN -> Conv)

on the shared base :class:`~fusenode.passes.fuse_bn_base.FuseBatchNormRule`. Every case where
folding could change what the model computes is declined with a reason, and every
BatchNormalization is in the report: fused, or skipped with why (including one whose input
comes from none of these families); a declined one is left exactly as it was.
"""

from __future__ import annotations

from fusenode.passes.fuse_bn_base import FuseBatchNormRule
from fusenode.passes.fuse_bn_before_conv import FuseBatchNormIntoNextConv
from fusenode.passes.fuse_bn_conv import FuseBatchNormIntoConv
from fusenode.passes.fuse_bn_conv_transpose import FuseBatchNormIntoConvTranspose
from fusenode.passes.fuse_bn_gemm import FuseBatchNormIntoGemm
from fusenode.passes.fuse_bn_matmul import FuseBatchNormIntoMatMul
from fusenode.passes.numerics import Backend

#: Recorded in the provenance of every model this pass wrote: changes with the output bytes.
NAME = "fuse-batchnorm"
VERSION = "1.1.0"

#: The rule set, tried in this order on every BatchNormalization: the folds into the op before
#: it first (they fold any padding), then the fold into the Conv after it.
RULES: tuple[type[FuseBatchNormRule], ...] = (
    FuseBatchNormIntoConv,
    FuseBatchNormIntoConvTranspose,
    FuseBatchNormIntoGemm,
    FuseBatchNormIntoMatMul,
    FuseBatchNormIntoNextConv,
)


def rules(backend: Backend) -> tuple[FuseBatchNormRule, ...]:
    """:data:`RULES`, each computing fused weights on ``backend``."""
    return tuple(rule(backend) for rule in RULES)
