"""BatchNormalization directly before a Conv (the Conv reads the BatchNormalization's output).

The BatchNormalization maps the Conv's input channel c to x'[c] = s[c] * x[c] + t[c], with
s = gamma / sqrt(var + eps) and t = beta - mean * s. The Conv's weight is W [M, C/group, k...]:
output channel m (of group g(m) = m // (M/group)) reads input channel
c(m, i) = g(m) * C/group + i through W[m, i]. Where every tap of the kernel reads a real input
value (no padding)::

    y[m] = sum_{i,k} W[m,i,k] * (s[c(m,i)] x[c(m,i)] + t[c(m,i)]) + b[m]

so, with b = 0 when the Conv has no bias::

    W'[m, i, k...] = W[m, i, k...] * s[c(m, i)]
    b'[m]          = b[m] + sum_{i,k} W[m, i, k] * t[c(m, i)]

in float64, rounded once to the storage dtype; strides and dilations change which inputs a tap
reads, not this sum. Padding is where it stops being exact: the original Conv pads x' with
zeros, the fused one pads x with zeros, which the BatchNormalization would have mapped to t,
and b' assumes every tap saw t. So the fold is exact when nothing is padded (``pads`` all 0,
``auto_pad`` VALID, or SAME_* with a kernel extent (k - 1) * dilation + 1 of 1 in every
dimension, which pads nothing for any input size) or when t is 0 for every channel (then b' = b
and a padded zero is the same before and after the BatchNormalization). Otherwise refused.

The BatchNormalization must have C = group * W.shape[1] channels, its output must be read by
this Conv alone (the Conv's first input) and not be a graph output: another reader would need
the BatchNormalization kept, and keeping it saves nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from fusenode.passes.framework import DEFAULT_DOMAINS, Constant, Fused, Scope, attr, node_key
from fusenode.passes.fuse_bn_base import (
    Fold,
    FuseBatchNormRule,
    Plan,
    all_finite,
    bn_affine,
    inference_form,
    release_bn,
    scaled_weight,
    weight_dtype_reason,
    weight_overflow,
)
from fusenode.passes.numerics import float_max, is_bfloat16, is_float, round_to
from fusenode.passes.onnxproto import NodeProto

#: Weight elements summed per step for b' (2 MiB of float64).
_CHUNK_ELEMENTS = 1 << 18


@dataclass(frozen=True)
class ConvReaderMatch:
    """A BatchNormalization and the Conv that reads its output."""

    bn: NodeProto
    op: NodeProto  # the Conv


class FuseBatchNormIntoNextConv(FuseBatchNormRule):
    """BatchNormalization -> Conv becomes one Conv with scaled weights and a new bias."""

    op_type = "Conv"
    position: ClassVar[str] = "before"

    # -- pattern -----------------------------------------------------------------------------
    def match(self, node: NodeProto, scope: Scope) -> ConvReaderMatch | None:
        if node.op_type != self.anchor or node.domain not in DEFAULT_DOMAINS or not node.output:
            return None
        y = node.output[0]
        if not y:
            return None
        conv = next(
            (
                n
                for n in scope.consumers(y)
                if n.op_type == "Conv" and n.domain in DEFAULT_DOMAINS and n.input[0] == y
            ),
            None,
        )
        return None if conv is None else ConvReaderMatch(node, conv)

    # -- check -------------------------------------------------------------------------------
    def check(self, m: ConvReaderMatch, scope: Scope) -> Plan | str:
        bn, conv = m.bn, m.op
        reason = inference_form(bn, scope.model.opset)
        if reason:
            return reason
        y = bn.output[0]
        if y in scope.outputs:
            return f"the BatchNormalization output {y!r} read by Conv is also a graph output"
        if scope.uses(y) != 1:
            return (
                f"the BatchNormalization output {y!r} read by Conv has {scope.uses(y) - 1} other "
                "reader(s), which need the BatchNormalization kept"
            )
        if len(conv.input) < 2 or not conv.input[1]:
            return "Conv has no weight input"
        w_const, why = scope.constant(conv.input[1])
        if w_const is None:
            return f"Conv weight {why}"
        b_const: Constant | None = None
        if len(conv.input) > 2 and conv.input[2]:
            b_const, why = scope.constant(conv.input[2])
            if b_const is None:
                return f"Conv bias {why}"
        stats = bn_affine(bn, scope)
        if isinstance(stats, str):
            return stats
        s, beta, mean = stats
        t = beta - mean * s
        w = w_const.array()
        if not is_float(w.dtype):
            return weight_dtype_reason("Conv", w)
        b = b_const.array() if b_const is not None else None
        if b is not None and b.dtype != w.dtype:
            return f"Conv bias dtype {b.dtype} differs from its weight's {w.dtype}"
        if w.ndim < 3:
            return f"Conv weight has rank {w.ndim}, expected at least 3"
        group = int(attr(conv, "group", 1))
        m_out, per_group = w.shape[0], w.shape[1]
        if group < 1 or m_out % group:
            return f"Conv's {m_out} output channels do not split in {group} groups"
        if per_group * group != s.shape[0]:
            return (
                f"Conv reads {per_group * group} input channels, BatchNormalization has "
                f"{s.shape[0]}"
            )
        if b is not None and b.shape != (m_out,):
            return f"Conv bias has shape {list(b.shape)}, expected [{m_out}]"
        if b is not None and not all_finite(b):
            return "Conv bias contains non-finite values"
        padded = _padding(conv, w)
        if padded and (t != 0).any():
            return (
                f"Conv pads its input ({padded}) and the BatchNormalization's shift "
                "beta - mean * s is not 0: the padded border would read the shift instead of 0"
            )

        # Per weight row m and column i: the input channel g(m) * C/group + i.
        def per_tap(v: np.ndarray) -> np.ndarray:
            rows = np.repeat(v.reshape(group, per_group), m_out // group, axis=0)
            return rows.reshape(rows.shape + (1,) * (w.ndim - 2))

        factor = per_tap(s)
        store = scope.model.store
        source = store.extent(w_const.tensor) if w_const.tensor is not None else None
        reason = weight_overflow(w, factor, "Conv")
        shift = None if reason or not t.any() else _tap_sums(w, per_tap(t))
        store.release(source)
        if reason:
            return reason
        base = np.zeros(m_out) if b is None else b.astype(np.float64)
        bias = round_to(base if shift is None else base + shift, w.dtype)
        if not all_finite(bias):
            return f"the fused bias would overflow {w.dtype} (max {float_max(w.dtype):g})"
        return Plan(w_const, w, Fold(factor, bias))

    # -- rewrite -----------------------------------------------------------------------------
    def rewrite(self, m: ConvReaderMatch, scope: Scope, plan: Plan) -> Fused:
        bn, conv = m.bn, m.op
        label = conv.name or conv.output[0]
        fused = Fused("BatchNormalization+Conv", node_key(bn), node_key(conv), scope.path)
        weight = scaled_weight(scope, plan, self.backend)
        scope.replace_input(conv, 1, weight, f"{label}_bnfused_W")
        scope.replace_input(conv, 2, plan.fold.bias, f"{label}_bnfused_B")
        y = bn.output[0]
        conv.input[0] = bn.input[0]  # the BatchNormalization's use of it becomes the Conv's
        scope.model.uses[y] -= 1
        if scope.model.uses[y] <= 0:
            del scope.model.uses[y]
        scope.remove_value_info(y)
        release_bn(bn, scope)
        return fused


def _padding(conv: NodeProto, w: np.ndarray) -> str:
    """What padding the Conv applies to some input, described; "" when none, for any size."""
    auto_pad = attr(conv, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    if auto_pad == "VALID":
        return ""
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        kernel = attr(conv, "kernel_shape", None) or list(w.shape[2:])
        dilations = attr(conv, "dilations", None) or [1] * len(kernel)
        extent = [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=False)]
        # SAME pads (ceil(n / stride) - 1) * stride + extent - n in total, which is 0 for every
        # input size n only when the extent is 1.
        return "" if all(e == 1 for e in extent) else f"auto_pad {auto_pad}, kernel extent {extent}"
    pads = attr(conv, "pads", None) or []
    return f"pads {list(pads)}" if any(pads) else ""


def _tap_sums(w: np.ndarray, t_taps: np.ndarray) -> np.ndarray:
    """sum over (i, k...) of W[m, i, k...] * t_taps[m, i] in float64, per output channel m,
    read in chunks of rows (no float64 copy of the whole weight)."""
    rows = w.shape[0]
    per_row = max(1, w.size // max(rows, 1))
    step = max(1, _CHUNK_ELEMENTS // per_row)
    out = np.empty(rows)
    axes = tuple(range(2, w.ndim))
    for r0 in range(0, rows, step):
        chunk = w[r0 : r0 + step]
        chunk = chunk.astype(np.float32) if is_bfloat16(chunk.dtype) else chunk
        taps = chunk.sum(axis=axes, dtype=np.float64)  # [rows, C/group]
        out[r0 : r0 + step] = (taps * t_taps[r0 : r0 + step].reshape(len(taps), -1)).sum(axis=1)
    return out
