"""Fold inference-mode BatchNormalization into the Conv / ConvTranspose / Gemm before it.

BatchNormalization in inference form is a per-channel affine map::

    y = s * x + t,   s = gamma / sqrt(var + eps),   t = beta - mean * s

When it is the only consumer of a linear op's output and normalizes that op's output channels,
it folds into the op's constants (all math in float64, rounded once to the storage dtype):

- Conv, W [M, C/group, k...]:      W'[m] = W[m] * s[m];     b' = (b - mean) * s + beta
- ConvTranspose, W [C, M/group, k...]: output channel m of group g is column m - g*M/group of
  rows g*C/group .. (g+1)*C/group - 1, so  W'[r, j] = W[r, j] * s[g(r)*M/group + j];  b' as Conv
- Gemm, Y = alpha*op(A)*op(B) + beta_g*C, channel axis N:
  B' = B * s along N (columns if transB=0, rows if transB=1), alpha and transA unchanged,
  C' = s * (beta_g*C - mean) + beta (C = 0 if absent; C' takes C's broadcast shape, or [N]),
  then beta_g = 1.

Every case where folding could change what the model computes is declined with a reason (the
report lists them); the model is then left exactly as it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import onnx
from fusenode.passes.framework import DEFAULT_DOMAINS, Constant, Fused, Scope, attr, node_key
from fusenode.passes.modelfile import Computed
from fusenode.passes.numerics import BF16, FLOAT_DTYPES, Backend, round_to

NAME = "fuse-batchnorm"
VERSION = "1.0.0"
LINEAR_OPS = ("Conv", "ConvTranspose", "Gemm")
_FLOAT_LIMITS = {dt: float(ml_dtypes.finfo(dt).max) for dt in FLOAT_DTYPES}


@dataclass
class BnMatch:
    bn: onnx.NodeProto
    op: onnx.NodeProto | None = None
    # filled in by check():
    weight: Computed | None = None
    bias: np.ndarray | None = None
    sources: list[Constant] = field(default_factory=list)


class FoldBatchNorm:
    """The rewrite: anchored on every BatchNormalization node, so each one is reported."""

    name = "BatchNormalization"

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    # -- pattern -------------------------------------------------------------------------
    def match(self, node: onnx.NodeProto, scope: Scope) -> BnMatch | None:
        if node.op_type != "BatchNormalization" or node.domain not in DEFAULT_DOMAINS:
            return None
        producer = scope.producer(node.input[0]) if node.input else None
        return BnMatch(node, producer)

    # -- check ---------------------------------------------------------------------------
    def check(self, m: BnMatch, scope: Scope) -> str | None:
        bn, op = m.bn, m.op
        reason = _inference_form(bn, scope.model.opset)
        if reason:
            return reason
        x = bn.input[0]
        if op is None:
            where = "a graph input" if x in scope.inputs else "not produced in this graph"
            return f"its input {x!r} is {where}, not the output of Conv/ConvTranspose/Gemm"
        if op.op_type not in LINEAR_OPS or op.domain not in DEFAULT_DOMAINS:
            return f"its input comes from {op.op_type}, not Conv/ConvTranspose/Gemm"
        if x in scope.outputs:
            return f"the {op.op_type} output {x!r} is also a graph output"
        if scope.uses(x) != 1:
            return f"the {op.op_type} output {x!r} has {scope.uses(x) - 1} other consumer(s)"
        if len(op.input) < 2 or not op.input[1]:
            return f"{op.op_type} has no weight input"

        # Constants: BN parameters, the op's weight and bias.
        params = []
        for name in bn.input[1:5]:
            const, why = scope.constant(name)
            if const is None:
                return f"BatchNormalization parameter {why}"
            params.append(const)
        w_const, why = scope.constant(op.input[1])
        if w_const is None:
            return f"{op.op_type} weight {why}"
        b_const = None
        if len(op.input) > 2 and op.input[2]:
            b_const, why = scope.constant(op.input[2])
            if b_const is None:
                return f"{op.op_type} {'C' if op.op_type == 'Gemm' else 'bias'} {why}"

        try:
            gamma, beta, mean, var = (p.array().astype(np.float64) for p in params)
        except (ValueError, TypeError) as e:
            return f"BatchNormalization parameters cannot be read as numbers ({e})"
        eps = float(np.float32(attr(bn, "epsilon", 1e-5)))
        channels = gamma.shape[0] if gamma.ndim == 1 else -1
        if any(p.ndim != 1 or p.shape[0] != channels for p in (gamma, beta, mean, var)):
            shapes = [list(p.shape) for p in (gamma, beta, mean, var)]
            return f"BatchNormalization parameters are not per-channel vectors ({shapes})"
        if not all(np.isfinite(p).all() for p in (gamma, beta, mean, var)):
            return "BatchNormalization parameters contain non-finite values"
        denom = var + eps
        if (denom <= 0).any():
            return "var + epsilon <= 0 for some channel"
        s = gamma / np.sqrt(denom)

        w = w_const.array()
        if w.dtype not in FLOAT_DTYPES:
            return f"{op.op_type} weight dtype {w.dtype} is not float16/bfloat16/float32/float64"
        b = b_const.array() if b_const is not None else None
        if b is not None and b.dtype != w.dtype:
            return f"{op.op_type} bias dtype {b.dtype} differs from its weight's {w.dtype}"

        fold = {"Conv": _fold_conv, "ConvTranspose": _fold_conv_transpose, "Gemm": _fold_gemm}
        result = fold[op.op_type](op, scope, w, b, s, beta, mean)
        if isinstance(result, str):
            return result
        factor, new_b = result
        limit = _FLOAT_LIMITS[w.dtype]
        if b is not None and not _all_finite(b):
            return (
                f"{op.op_type} {'C' if op.op_type == 'Gemm' else 'bias'} contains non-finite values"
            )
        if not _all_finite(new_b):
            return f"the fused bias would overflow {w.dtype} (max {limit:g})"
        store = scope.model.store
        # The weight's bytes as loaded (the rewrite may point its tensor elsewhere).
        source = store.extent(w_const.tensor) if w_const.tensor is not None else None
        reason = _weight_overflow(w, factor, op.op_type)
        store.release(source)
        if reason:
            return reason
        backend = self.backend

        def fused_weight() -> np.ndarray:
            # Runs while the output is written: the weight is read once more, scaled and
            # written out, never held beside the others.
            out = backend.scale(w, factor)
            store.release(source)
            return out

        m.weight = Computed(w.shape, w.dtype, fused_weight)
        m.bias = new_b
        return None

    # -- rewrite -------------------------------------------------------------------------
    def rewrite(self, m: BnMatch, scope: Scope) -> Fused:
        bn, op = m.bn, m.op
        assert op is not None and m.weight is not None and m.bias is not None
        label = op.name or op.output[0]
        fused = Fused(f"{op.op_type}+BatchNormalization", node_key(bn), node_key(op), scope.path)
        scope.replace_input(op, 1, m.weight, f"{label}_bnfused_W")
        scope.replace_input(op, 2, m.bias, f"{label}_bnfused_B")
        if op.op_type == "Gemm":
            _set_float_attr(op, "beta", 1.0)
        old_out = op.output[0]
        op.output[0] = bn.output[0]
        scope.producers.pop(old_out, None)
        scope.remove_node(bn)
        scope.producers[op.output[0]] = op
        scope.model.uses[old_out] -= 1
        if scope.model.uses[old_out] <= 0:
            del scope.model.uses[old_out]
        scope.remove_value_info(old_out)
        for name in bn.input[1:5]:
            scope.release(name)
        return fused


# -- the forms of BatchNormalization over its opset history ------------------------------


def _inference_form(bn: onnx.NodeProto, opset: int) -> str | None:
    """Why this BatchNormalization is not the inference form of its opset, or None.

    - opset 1 and 6: attribute is_test (default 0 = training); spatial (default 1);
    - opset 7: is_test removed; spatial stays; training form = extra outputs;
    - opset 9: spatial removed; extra outputs still mean training;
    - opset 14, 15: attribute training_mode (default 0); extra outputs only in training mode.
    """
    if len(bn.input) < 5 or not all(bn.input[:5]):
        return "BatchNormalization does not have its five inputs"
    outputs = [o for o in bn.output if o]
    if len(outputs) != 1 or not bn.output[0]:
        return f"BatchNormalization has {len(outputs)} outputs: the training form"
    if opset < 7 and not attr(bn, "is_test", 0):
        return "BatchNormalization has is_test=0: the training form"
    if opset < 9 and attr(bn, "spatial", 1) != 1:
        return "BatchNormalization has spatial=0 (per-activation statistics)"
    if opset >= 14 and attr(bn, "training_mode", 0):
        return "BatchNormalization has training_mode=1"
    return None


# -- the three folds: each returns (new weight, new bias) or a reason ----------------------


def _bias_vector(b, mean, s, beta, dtype, channels):
    base = np.zeros(channels) if b is None else b.astype(np.float64)
    return round_to((base - mean) * s + beta, dtype)


def _weight_overflow(w: np.ndarray, factor: np.ndarray, op_type: str) -> str | None:
    """Exactly whether round(w * factor) overflows, without computing the product.

    Rounding is monotonic, so the product overflows iff the largest |w| in each group sharing
    one factor, times that factor, does. Max and min reductions read the weight once and
    allocate nothing of its size.
    """
    if w.size == 0:
        return None
    axes = tuple(i for i in range(w.ndim) if factor.shape[i] == 1)
    wf = w.astype(np.float32) if w.dtype == BF16 else w
    hi = np.max(wf, axis=axes, keepdims=True).astype(np.float64)
    lo = np.min(wf, axis=axes, keepdims=True).astype(np.float64)
    absmax = np.maximum(hi, -lo)
    if not np.isfinite(absmax).all():
        return f"{op_type} weight contains non-finite values"
    if not _all_finite(round_to(absmax * np.abs(factor), w.dtype)):
        return f"the fused weight would overflow {w.dtype} (max {_FLOAT_LIMITS[w.dtype]:g})"
    return None


def _fold_conv(op, scope, w, b, s, beta, mean):
    if w.ndim < 3:
        return f"Conv weight has rank {w.ndim}, expected at least 3"
    if w.shape[0] != s.shape[0]:
        return f"Conv has {w.shape[0]} output channels, BatchNormalization {s.shape[0]}"
    if b is not None and b.shape != (w.shape[0],):
        return f"Conv bias has shape {list(b.shape)}, expected [{w.shape[0]}]"
    factor = s.reshape((-1,) + (1,) * (w.ndim - 1))
    return factor, _bias_vector(b, mean, s, beta, w.dtype, w.shape[0])


def _fold_conv_transpose(op, scope, w, b, s, beta, mean):
    group = int(attr(op, "group", 1))
    if w.ndim < 3:
        return f"ConvTranspose weight has rank {w.ndim}, expected at least 3"
    if group < 1 or w.shape[0] % group:
        return f"ConvTranspose weight's {w.shape[0]} input channels do not split in {group} groups"
    channels = w.shape[1] * group
    if channels != s.shape[0]:
        return f"ConvTranspose has {channels} output channels, BatchNormalization {s.shape[0]}"
    if b is not None and b.shape != (channels,):
        return f"ConvTranspose bias has shape {list(b.shape)}, expected [{channels}]"
    per_group = w.shape[1]
    rows = np.repeat(s.reshape(group, per_group), w.shape[0] // group, axis=0)
    factor = rows.reshape(rows.shape + (1,) * (w.ndim - 2))
    return factor, _bias_vector(b, mean, s, beta, w.dtype, channels)


def _fold_gemm(op, scope, w, c, s, beta, mean):
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
        if scope.model.opset < 7 and not attr(op, "broadcast", 0) and c.ndim != 2:
            return "Gemm (opset < 7, broadcast=0) has a C that is not [M, N]"
        base = beta_g * c.astype(np.float64)
    else:
        base = np.zeros(n)
    new_c = round_to(s * (base - mean) + beta, w.dtype)
    factor = s.reshape(n, 1) if trans_b else s.reshape(1, n)
    return factor, new_c


def _all_finite(a: np.ndarray) -> bool:
    return bool(np.isfinite(a.astype(np.float32) if a.dtype == BF16 else a).all())


def _set_float_attr(node: onnx.NodeProto, name: str, value: float) -> None:
    for a in node.attribute:
        if a.name == name:
            a.f = value
            return
    node.attribute.append(onnx.helper.make_attribute(name, value))
