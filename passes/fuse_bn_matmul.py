"""BatchNormalization after MatMul, with or without an Add of a constant bias between them.

MatMul(A, W) with a constant 2-D W [K, N] gives Y [..., M, N] of the rank r of A (r >= 2;
numpy's matmul). A Linear layer is often exported as MatMul + Add(c), c a constant bias; the
Add is folded too when c broadcasts along N only (its shape is [], [N] or [1, ..., 1, N] with
the 1s and N optional, of rank <= r), so it neither grows Y nor varies along another axis.
BatchNormalization normalizes axis 1 of its input::

    y'[:, ch, ...] = s[ch] * y[:, ch, ...] + t[ch],   s = gamma / sqrt(var + eps),
                                                     t = beta - mean * s

- r = 2: Y is [M, N] and axis 1 is N, the product's output features. With c = 0 when there is
  no Add::

      W'[:, n] = W[:, n] * s[n]
      b'[n]    = (c[n] - mean[n]) * s[n] + beta[n]

  and the three nodes become one Gemm(A, W', b') (alpha = beta = 1, no transposes; before
  opset 7, broadcast = 1 for b').
- r >= 3: axis 1 is a row axis of the product (M for r = 3, a batch axis for r >= 4), never N.
  s[ch] then scales rows of A @ W, which no change of the shared W can do unless every channel
  has the same scale s0. That is the exact case::

      W' = W * s0
      T[ch, 1, ..., 1, n] = (c[n] - mean[ch]) * s0 + beta[ch]     (rank r - 1)

  and the result is MatMul(A, W') + T: T's leading axis lines up with axis 1 of the output as
  the BatchNormalization's vectors do, and its last axis is N or 1, so the output shape is
  unchanged. Any other scales are refused.
- r unknown (the model declares no shape for A, Y or the BatchNormalization's output, and A is
  not the output of a Flatten or Gemm): refused, as is r = 1 (BatchNormalization takes no
  vector).

Everything is computed in float64 and rounded once to the storage dtype; W' goes through the
backend (numpy, or torch on CUDA) like every fold's weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fusenode.passes.framework import DEFAULT_DOMAINS, Fused, Scope, attr, node_key
from fusenode.passes.fuse_bn_base import (
    Fold,
    FuseBatchNormRule,
    Plan,
    all_finite,
    bn_affine,
    folded_away,
    inference_form,
    release_bn,
    scaled_weight,
    weight_dtype_reason,
    weight_overflow,
)
from fusenode.passes.numerics import float_max, is_float, round_to
from fusenode.passes.onnxproto import NodeProto, make_int_attribute

#: Ops whose output is 2-D whatever their input: enough to know a MatMul input's rank.
_RANK_2_OPS = ("Flatten", "Gemm")


@dataclass(frozen=True)
class MatMulMatch:
    """A BatchNormalization reading MatMul(A, W), or Add(MatMul(A, W), c)."""

    bn: NodeProto
    op: NodeProto  # the MatMul
    add: NodeProto | None
    bias_index: int  # the Add's input holding c (-1 without an Add)


@dataclass(frozen=True)
class MatMulPlan(Plan):
    """The fold (factor [1, N] for rank 2, [1, 1] for rank >= 3; bias b' [N] or T) and the rank
    of the MatMul's output, which decides what the rewrite writes."""

    rank: int = 2


class FuseBatchNormIntoMatMul(FuseBatchNormRule):
    """MatMul [-> Add] -> BatchNormalization becomes Gemm (2-D) or MatMul + Add (exact cases)."""

    op_type = "MatMul"

    # -- pattern -----------------------------------------------------------------------------
    def match(self, node: NodeProto, scope: Scope) -> MatMulMatch | None:
        if node.op_type != self.anchor or node.domain not in DEFAULT_DOMAINS or not node.input:
            return None
        op = scope.producer(node.input[0])
        if op is None or op.domain not in DEFAULT_DOMAINS:
            return None
        if op.op_type == "MatMul":
            return MatMulMatch(node, op, None, -1)
        if op.op_type != "Add" or len(op.input) != 2:
            return None
        found = [
            i
            for i in (0, 1)
            if (p := scope.producer(op.input[i])) is not None
            and p.op_type == "MatMul"
            and p.domain in DEFAULT_DOMAINS
        ]
        if not found:
            return None
        # Of two MatMuls, the one whose partner is a constant (the other cannot fold).
        i = next((i for i in found if scope.constant(op.input[1 - i])[0] is not None), found[0])
        return MatMulMatch(node, scope.producer(op.input[i]), op, 1 - i)

    # -- check -------------------------------------------------------------------------------
    def check(self, m: MatMulMatch, scope: Scope) -> MatMulPlan | str:
        bn, op, add = m.bn, m.op, m.add
        opset = scope.model.opset
        reason = inference_form(bn, opset)
        if reason:
            return reason
        for node in (op, add) if add is not None else (op,):
            reason = folded_away(node, scope)
            if reason:
                return reason
        if len(op.input) != 2 or not all(op.input):
            return "MatMul does not have its two inputs"
        w_const, why = scope.constant(op.input[1])
        if w_const is None:
            return f"MatMul weight {why}"
        stats = bn_affine(bn, scope)
        if isinstance(stats, str):
            return stats
        s, beta, mean = stats
        w = w_const.array()
        if not is_float(w.dtype):
            return weight_dtype_reason("MatMul", w)
        if w.ndim != 2:
            return f"MatMul weight has rank {w.ndim}, expected 2"
        n = w.shape[1]
        c = None
        if add is not None:
            c = self._add_bias(m, scope, w, n)
            if isinstance(c, str):
                return c
        rank = self._rank(m, scope)
        if rank is None:
            return (
                f"the rank of the MatMul input {op.input[0]!r} is unknown (the model declares "
                "no shape for it: run shape inference first)"
            )
        if rank < 2:
            return f"the MatMul output has rank {rank}: BatchNormalization takes rank >= 2"
        if c is not None and c.ndim > rank:
            return f"the Add's constant has rank {c.ndim}, more than the MatMul output's {rank}"
        vec = np.zeros(1) if c is None else c.astype(np.float64).reshape(-1)  # [1] or [N]
        channels = s.shape[0]
        if rank == 2:
            if channels != n:
                return f"MatMul has {n} output columns, BatchNormalization {channels} channels"
            factor = s.reshape(1, n)
            bias = round_to((vec - mean) * s + beta, w.dtype)
        else:
            if not (s == s[0]).all():
                return (
                    f"BatchNormalization normalizes axis 1 of a rank-{rank} MatMul output, a row "
                    "axis of the product, not its N columns: exact only when every channel has "
                    "the same scale gamma / sqrt(var + eps), and these differ"
                )
            if opset < 7:
                return "opset < 7: Add has no multidirectional broadcasting for the bias"
            s0 = s[0]
            factor = np.full((1, 1), s0)
            t = (vec[None, :] - mean[:, None]) * s0 + beta[:, None]  # [C, N or 1]
            bias = round_to(t.reshape((channels,) + (1,) * (rank - 3) + (vec.size,)), w.dtype)
        if not all_finite(bias):
            return f"the fused bias would overflow {w.dtype} (max {float_max(w.dtype):g})"
        store = scope.model.store
        source = store.extent(w_const.tensor) if w_const.tensor is not None else None
        reason = weight_overflow(w, factor, "MatMul")
        store.release(source)
        return reason if reason is not None else MatMulPlan(w_const, w, Fold(factor, bias), rank)

    def _add_bias(self, m: MatMulMatch, scope: Scope, w: np.ndarray, n: int) -> np.ndarray | str:
        """The Add's constant c, or why it does not fold (broadcasting along N only)."""
        add = m.add
        assert add is not None
        const, why = scope.constant(add.input[m.bias_index])
        if const is None:
            return f"Add bias {why}"
        c = const.array()
        if c.dtype != w.dtype:
            return f"Add bias dtype {c.dtype} differs from the MatMul weight's {w.dtype}"
        if c.ndim and (c.shape[-1] not in (1, n) or any(d != 1 for d in c.shape[:-1])):
            return (
                f"the Add's constant of shape {list(c.shape)} does not broadcast along N={n} only"
            )
        if scope.model.opset < 7 and (
            m.bias_index != 1 or not attr(add, "broadcast", 0) or attr(add, "axis") is not None
        ):
            return (
                "opset < 7: the Add's broadcast/axis attributes are not the plain broadcast of "
                "its second input along the last axis"
            )
        if not all_finite(c):
            return "Add bias contains non-finite values"
        return c

    @staticmethod
    def _rank(m: MatMulMatch, scope: Scope) -> int | None:
        """The MatMul output's rank, from what the model declares (A's rank is Y's for r >= 2)."""
        names = [m.op.input[0], m.op.output[0], m.bn.output[0]]
        if m.add is not None:
            names.insert(2, m.add.output[0])
        for name in names:
            rank = scope.rank(name)
            if rank is not None:
                return rank
        p = scope.producer(m.op.input[0])
        if p is not None and p.op_type in _RANK_2_OPS and p.domain in DEFAULT_DOMAINS:
            return 2
        return None

    # -- rewrite -----------------------------------------------------------------------------
    def rewrite(self, m: MatMulMatch, scope: Scope, plan: MatMulPlan) -> Fused:
        bn, op, add = m.bn, m.op, m.add
        label = op.name or op.output[0]
        pattern = (
            "MatMul+Add+BatchNormalization" if add is not None else "MatMul+BatchNormalization"
        )
        fused = Fused(pattern, node_key(bn), node_key(op), scope.path)
        scope.replace_input(op, 1, scaled_weight(scope, plan, self.backend), f"{label}_bnfused_W")
        out = op.output[0]
        if add is not None:
            scope.remove_node(add)
            scope.release(add.input[m.bias_index])
            scope.release(out)  # the Add's use
            scope.release(add.output[0])  # the BatchNormalization's use
            scope.remove_value_info(add.output[0])
        else:
            scope.release(out)  # the BatchNormalization's use
        release_bn(bn, scope)
        if plan.rank == 2:
            # MatMul(A, W) + b' on a 2-D A is Gemm(A, W', b'), writing the BN's output.
            op.op_type = "Gemm"
            if scope.model.opset < 7:
                op.attribute.append(make_int_attribute("broadcast", 1))
            scope.producers.pop(out, None)
            op.output[0] = bn.output[0]
            scope.producers[op.output[0]] = op
            scope.remove_value_info(out)
            scope.replace_input(op, 2, plan.fold.bias, f"{label}_bnfused_C")
            return fused
        # Rank >= 3, one scale for all channels: MatMul(A, W') + T writes the BN's output.
        t_name = scope.model.fresh_name(f"{label}_bnfused_T")
        scope.add_initializer(t_name, plan.fold.bias)
        node = NodeProto()
        node.op_type = "Add"
        if bn.name:
            node.name = scope.model.fresh_name(f"{label}_bnfused_add")
        node.input.extend([out, t_name])
        node.output.append(bn.output[0])
        scope.model.uses.update([out, t_name])
        position = next(i for i, n in enumerate(scope.graph.node) if n.output[:1] == [out])
        scope.graph.node.insert(position + 1, node)
        scope.producers[bn.output[0]] = scope.graph.node[position + 1]
        return fused
