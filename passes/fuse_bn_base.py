"""What every BatchNormalization fold shares: the pattern, the checks, the rewrite.

Inference-form BatchNormalization is a per-channel affine map::

    y = s * x + t,   s = gamma / sqrt(var + eps),   t = beta - mean * s

:class:`FuseBatchNormRule` is the base of the rules that fold it into the op before it (one
subclass per op family, each with its math: :mod:`fuse_bn_conv`, :mod:`fuse_bn_conv_transpose`,
:mod:`fuse_bn_gemm`). The base checks what does not depend on the family: the inference form of
the BatchNormalization's opset, constant parameters, the op's output used by the
BatchNormalization alone and not a graph output, per-channel finite statistics with
var + eps > 0, float storage dtypes, and that neither the fused bias nor the fused weight
overflows. A subclass's :meth:`FuseBatchNormRule.fold` checks the channel alignment and returns
the per-channel :class:`Fold`.

Two rules change the graph's shape as well as the constants and so bring their own pattern,
check and rewrite, built from the helpers here (:func:`inference_form`, :func:`bn_affine`,
:func:`weight_overflow`, :func:`release_bn`) and the same :class:`Plan`: :mod:`fuse_bn_matmul`
(MatMul [-> Add] -> BN becomes Gemm, or MatMul + Add) and :mod:`fuse_bn_before_conv` (BN ->
Conv, ``position = "before"``).

``check`` has no side effects: it computes a :class:`Plan` (per-channel vectors, read-only,
and a view of the stored weight), scans the weight for overflow and, when it accepts, returns
the plan, which the framework hands to ``rewrite`` unchanged: the rewrite works from what the
check saw and computes nothing again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from fusenode.passes.framework import DEFAULT_DOMAINS, Constant, Fused, Rule, Scope, attr, node_key
from fusenode.passes.numerics import Backend, float_max, is_bfloat16, is_float, round_to
from fusenode.passes.onnxproto import NodeProto
from fusenode.passes.tensorstore import Computed


@dataclass(frozen=True)
class BnMatch:
    """The pattern's two nodes: a BatchNormalization and the op whose output it normalizes."""

    bn: NodeProto
    op: NodeProto


@dataclass(frozen=True)
class Operands:
    """What a family's fold works from, once the shared checks passed."""

    op: NodeProto
    opset: int
    w: np.ndarray  # the weight as stored
    b: np.ndarray | None  # the bias (Gemm: C) as stored, or None
    s: np.ndarray  # gamma / sqrt(var + eps), float64
    beta: np.ndarray  # float64
    mean: np.ndarray  # float64


@dataclass(frozen=True)
class Fold:
    """A family's fold, per channel: W' = round(W * factor); ``bias`` replaces the op's bias.

    Immutable: both arrays are made read-only here (a plan travels from check to rewrite).
    """

    factor: np.ndarray  # float64, broadcasts against the weight
    bias: np.ndarray  # in the weight's storage dtype

    def __post_init__(self) -> None:
        self.factor.flags.writeable = False
        self.bias.flags.writeable = False


@dataclass(frozen=True)
class Plan:
    """Everything the rewrite needs: what :meth:`FuseBatchNormRule.check` returns to accept."""

    weight: Constant
    w: np.ndarray  # the weight as stored (a view of the input file where it can be)
    fold: Fold


class FuseBatchNormRule:
    """Fold a BatchNormalization into the ``op_type`` op whose output it normalizes."""

    anchor: ClassVar[str] = "BatchNormalization"
    #: The op family this rule folds into; set by each subclass.
    op_type: ClassVar[str]
    #: What the report calls the op's third input.
    bias_name: ClassVar[str] = "bias"
    #: Where the op sits: "after" it the BatchNormalization (its input comes from the op), or
    #: "before" it (the op reads the BatchNormalization's output).
    position: ClassVar[str] = "after"

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    # -- the family's part -------------------------------------------------------------------
    def fold(self, x: Operands) -> Fold | str:
        """The fold of the BatchNormalization into ``x.op``, or why the channels do not line
        up. Reads the weight's shape and dtype only (its values may be gigabytes)."""
        raise NotImplementedError

    def rewrite_attributes(self, op: NodeProto) -> None:
        """Attribute changes the fold implies (none for most families)."""

    # -- pattern -----------------------------------------------------------------------------
    def match(self, node: NodeProto, scope: Scope) -> BnMatch | None:
        if node.op_type != self.anchor or node.domain not in DEFAULT_DOMAINS or not node.input:
            return None
        op = scope.producer(node.input[0])
        if op is None or op.op_type != self.op_type or op.domain not in DEFAULT_DOMAINS:
            return None
        return BnMatch(node, op)

    def unmatched(self, node: NodeProto, scope: Scope, rules: Sequence[Rule]) -> str:
        """Why no rule of the set matched this BatchNormalization."""
        reason = inference_form(node, scope.model.opset)
        if reason:  # reported first, as for a matched BatchNormalization
            return reason
        ours = [r for r in rules if isinstance(r, FuseBatchNormRule)]
        families = "/".join(r.op_type for r in ours if r.position == "after")
        readers = "/".join(r.op_type for r in ours if r.position == "before")
        parts = []
        if families:
            x = node.input[0]
            op = scope.producer(x)
            if op is None:
                where = "a graph input" if x in scope.inputs else "not produced in this graph"
                parts.append(f"its input {x!r} is {where}, not the output of {families}")
            else:
                parts.append(f"its input comes from {op.op_type}, not {families}")
        if readers:
            parts.append(f"no {readers} reads its output")
        return ", and ".join(parts)

    # -- check -------------------------------------------------------------------------------
    def check(self, m: BnMatch, scope: Scope) -> Plan | str:
        """The plan the rewrite follows, or why this BatchNormalization is not folded."""
        plan = self.plan(m, scope)
        if isinstance(plan, str):
            return plan
        store = scope.model.store
        # The scan reads the whole weight; let the kernel drop its pages from this process
        # afterwards (a memory hint: no value or store entry changes).
        source = store.extent(plan.weight.tensor) if plan.weight.tensor is not None else None
        reason = weight_overflow(plan.w, plan.fold.factor, self.op_type)
        store.release(source)
        return plan if reason is None else reason

    def plan(self, m: BnMatch, scope: Scope) -> Plan | str:
        """All checks but the weight scan, in the order their reasons are reported."""
        bn, op = m.bn, m.op
        reason = inference_form(bn, scope.model.opset)
        if reason:
            return reason
        reason = folded_away(op, scope)
        if reason:
            return reason
        if len(op.input) < 2 or not op.input[1]:
            return f"{op.op_type} has no weight input"
        consts = self._constants(m, scope)
        if isinstance(consts, str):
            return consts
        params, w_const, b_const = consts
        stats = _scale(bn, params)
        if isinstance(stats, str):
            return stats
        s, beta, mean = stats

        w = w_const.array()
        if not is_float(w.dtype):
            return weight_dtype_reason(op.op_type, w)
        b = b_const.array() if b_const is not None else None
        if b is not None and b.dtype != w.dtype:
            return f"{op.op_type} bias dtype {b.dtype} differs from its weight's {w.dtype}"
        fold = self.fold(Operands(op, scope.model.opset, w, b, s, beta, mean))
        if isinstance(fold, str):
            return fold
        if b is not None and not all_finite(b):
            return f"{op.op_type} {self.bias_name} contains non-finite values"
        if not all_finite(fold.bias):
            return f"the fused bias would overflow {w.dtype} (max {float_max(w.dtype):g})"
        return Plan(w_const, w, fold)

    def _constants(
        self, m: BnMatch, scope: Scope
    ) -> tuple[list[Constant], Constant, Constant | None] | str:
        """The BatchNormalization's four parameters, the op's weight and bias, as constants."""
        op = m.op
        params = []
        for name in m.bn.input[1:5]:
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
                return f"{op.op_type} {self.bias_name} {why}"
        return params, w_const, b_const

    # -- rewrite -----------------------------------------------------------------------------
    def rewrite(self, m: BnMatch, scope: Scope, plan: Plan) -> Fused:
        bn, op = m.bn, m.op
        label = op.name or op.output[0]
        fused = Fused(f"{op.op_type}+{self.anchor}", node_key(bn), node_key(op), scope.path)
        scope.replace_input(op, 1, scaled_weight(scope, plan, self.backend), f"{label}_bnfused_W")
        scope.replace_input(op, 2, plan.fold.bias, f"{label}_bnfused_B")
        self.rewrite_attributes(op)
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


def inference_form(bn: NodeProto, opset: int) -> str | None:
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


def bn_affine(bn: NodeProto, scope: Scope) -> tuple[np.ndarray, np.ndarray, np.ndarray] | str:
    """``(s, beta, mean)`` in float64 from the BatchNormalization's constant parameters, or why
    they cannot be folded (not constants, not per-channel, non-finite, var + eps <= 0)."""
    params = []
    for name in bn.input[1:5]:
        const, why = scope.constant(name)
        if const is None:
            return f"BatchNormalization parameter {why}"
        params.append(const)
    return _scale(bn, params)


def folded_away(node: NodeProto, scope: Scope) -> str | None:
    """Why ``node``'s output cannot disappear into the fold (it is a graph output, or read by
    more than the next node of the pattern), or None."""
    out = node.output[0]
    if out in scope.outputs:
        return f"the {node.op_type} output {out!r} is also a graph output"
    if scope.uses(out) != 1:
        return f"the {node.op_type} output {out!r} has {scope.uses(out) - 1} other consumer(s)"
    return None


def weight_dtype_reason(op_type: str, w: np.ndarray) -> str:
    return f"{op_type} weight dtype {w.dtype} is not float16/bfloat16/float32/float64"


def scaled_weight(scope: Scope, plan: Plan, backend: Backend) -> Computed:
    """The fused weight W * factor as a tensor computed while the output is written: the
    original weight is read once more, scaled by ``backend`` and written out, never held
    beside the others."""
    store = scope.model.store
    w, factor = plan.w, plan.fold.factor
    source = store.extent(plan.weight.tensor) if plan.weight.tensor is not None else None

    def fused_weight() -> np.ndarray:
        out = backend.scale(w, factor)
        store.release(source)
        return out

    return Computed(w.shape, w.dtype, fused_weight)


def release_bn(bn: NodeProto, scope: Scope) -> None:
    """Remove the BatchNormalization node and drop its parameters' uses (constants that nobody
    uses any more go with it)."""
    scope.remove_node(bn)
    for name in bn.input[1:5]:
        scope.release(name)


def _scale(
    bn: NodeProto, params: list[Constant]
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | str:
    """``(s, beta, mean)`` in float64, or why the statistics cannot be folded."""
    try:
        gamma, beta, mean, var = (p.array().astype(np.float64) for p in params)
    except (ValueError, TypeError) as e:
        return f"BatchNormalization parameters cannot be read as numbers ({e})"
    eps = float(np.float32(attr(bn, "epsilon", 1e-5)))  # a float32 attribute: its exact value
    channels = gamma.shape[0] if gamma.ndim == 1 else -1
    if any(p.ndim != 1 or p.shape[0] != channels for p in (gamma, beta, mean, var)):
        shapes = [list(p.shape) for p in (gamma, beta, mean, var)]
        return f"BatchNormalization parameters are not per-channel vectors ({shapes})"
    if not all(np.isfinite(p).all() for p in (gamma, beta, mean, var)):
        return "BatchNormalization parameters contain non-finite values"
    denom = var + eps
    if (denom <= 0).any():
        return "var + epsilon <= 0 for some channel"
    return gamma / np.sqrt(denom), beta, mean


def bias_vector(x: Operands, channels: int) -> np.ndarray:
    """b' = (b - mean) * s + beta in float64 (b = 0 when absent), rounded once to the weight's
    dtype."""
    base = np.zeros(channels) if x.b is None else x.b.astype(np.float64)
    return round_to((base - x.mean) * x.s + x.beta, x.w.dtype)


def weight_overflow(w: np.ndarray, factor: np.ndarray, op_type: str) -> str | None:
    """Exactly whether round(w * factor) overflows, without computing the product.

    Rounding is monotonic, so the product overflows iff the largest |w| in each group sharing
    one factor, times that factor, does. Max and min reductions read the weight once and
    allocate nothing of its size.
    """
    if w.size == 0:
        return None
    axes = tuple(i for i in range(w.ndim) if factor.shape[i] == 1)
    wf = w.astype(np.float32) if is_bfloat16(w.dtype) else w  # numpy cannot reduce bfloat16
    hi = np.max(wf, axis=axes, keepdims=True).astype(np.float64)
    lo = np.min(wf, axis=axes, keepdims=True).astype(np.float64)
    absmax = np.maximum(hi, -lo)
    if not np.isfinite(absmax).all():
        return f"{op_type} weight contains non-finite values"
    if not all_finite(round_to(absmax * np.abs(factor), w.dtype)):
        return f"the fused weight would overflow {w.dtype} (max {float_max(w.dtype):g})"
    return None


def all_finite(a: np.ndarray) -> bool:
    return bool(np.isfinite(a.astype(np.float32) if is_bfloat16(a.dtype) else a).all())
