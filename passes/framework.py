"""A small pass framework: pattern -> check -> rewrite, over every graph of a model.

A :class:`Rule` is rooted at one op type, its ``anchor``, and has three steps:

- ``match(node, scope)``: the pattern. Returns a match object, or ``None`` when the pattern is
  not there (e.g. a BatchNormalization whose input comes from another op family).
- ``check(match, scope)``: returns the *reason* it declines (a string, reported to the user),
  or, to accept, anything else: ``None``, or an immutable *plan* of what it worked out, which
  the framework hands to ``rewrite`` (so the rewrite need not work it out again). A check never
  raises for a model it cannot handle; it explains. It has no side effects: it changes neither
  the match, the graph, its indexes nor any tensor or reference in the store (it may read
  through the store's file mappings), so running it twice, or not acting on it, leaves
  everything as it was.
- ``rewrite(match, scope, plan)``: changes the graph; ``plan`` is what check returned. Only
  called right after check accepted.

Every anchor node ends up in the report: fused by the first rule that matches and accepts, or
skipped with the reasons of the rules that matched (joined with "; ", first matched first), or,
when no rule's pattern matched, with ``unmatched(node, scope, rules)`` of the first rule
anchored there.

:func:`run_rewrites` applies a rule set to the main graph and to every subgraph (If / Loop /
Scan bodies, at any depth), repeating until nothing more matches (so chains like
Conv -> BN -> BN fold completely), and returns a :class:`PassReport`.

:class:`Scope` is one graph with its enclosing graphs: it resolves constants through outer
scopes, tracks how often every value name is used anywhere in the model, and replaces weights
without corrupting other users of a shared tensor.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

from fusenode.passes.onnxproto import (
    GraphProto,
    ModelProto,
    NodeProto,
    TensorProto,
    get_attribute_value,
    make_tensor_value_info,
    np_dtype_to_tensor_dtype,
)
from fusenode.passes.tensorstore import Computed, TensorStore

DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class Fused:
    pattern: str
    node: str  # the BatchNormalization (or other) node removed
    into: str  # the node it was folded into
    graph: str


@dataclass(frozen=True)
class Skipped:
    pattern: str
    node: str
    graph: str
    reason: str


@dataclass
class PassReport:
    name: str
    version: str
    fused: list[Fused] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    nodes_before: int = 0
    nodes_after: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "pass": self.name,
            "version": self.version,
            "fused": [asdict(f) for f in self.fused],
            "skipped": [asdict(s) for s in self.skipped],
            "n_fused": len(self.fused),
            "n_skipped": len(self.skipped),
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "seconds": round(self.seconds, 4),
        }


@dataclass
class Constant:
    """A value known before run time: an initializer or a Constant node's output."""

    name: str
    scope: Scope
    tensor: TensorProto | None  # None for Constant nodes with value_float(s)/value_int(s)
    node: NodeProto | None = None  # the Constant node, when it is one

    def array(self) -> np.ndarray:
        if self.tensor is not None:
            return self.scope.model.store.array(self.tensor)
        return _constant_attr_value(self.node)


class Rule(Protocol):
    #: The op type (default ONNX domain) at the root of the pattern.
    anchor: str

    def match(self, node: NodeProto, scope: Scope) -> Any | None: ...

    def check(self, match: Any, scope: Scope) -> str | Any:
        """The reason to decline (a str), or what to hand ``rewrite`` (anything else)."""
        ...

    def rewrite(self, match: Any, scope: Scope, plan: Any) -> Fused: ...

    def unmatched(self, node: NodeProto, scope: Scope, rules: Sequence[Rule]) -> str:
        """Why none of ``rules`` (all anchored at ``node``'s op type) matched ``node``."""
        ...


class ModelContext:
    """What all scopes of one model share."""

    def __init__(self, model: ModelProto, store: TensorStore) -> None:
        self.model = model
        self.store = store
        self.opset = next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), 0)
        self.ir_version = model.ir_version
        self.uses: Counter[str] = Counter()
        self.names: set[str] = set()
        for graph in _graphs(model.graph):
            for node in graph.node:
                self.uses.update(n for n in node.input if n)
                self.names.update(node.output)
                self.names.add(node.name)
            self.uses.update(o.name for o in graph.output)
            self.names.update(t.name for t in graph.initializer)
            self.names.update(i.name for i in graph.input)

    def fresh_name(self, base: str) -> str:
        name, i = base, 1
        while name in self.names:
            i += 1
            name = f"{base}_{i}"
        self.names.add(name)
        return name


class Scope:
    """One graph, its enclosing scopes, and indexes kept up to date by the edits below."""

    def __init__(
        self, graph: GraphProto, model: ModelContext, parent: Scope | None, path: str
    ) -> None:
        self.graph = graph
        self.model = model
        self.parent = parent
        self.path = path
        #: ids of the nodes removed from this graph (a sweep skips them; it holds them all).
        self.removed: set[int] = set()
        self._readers: dict[str, list[NodeProto]] | None = None  # see consumers()
        self._reindex()

    def _reindex(self) -> None:
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.inputs = {i.name for i in self.graph.input}
        self.outputs = {o.name for o in self.graph.output}
        self.producers: dict[str, NodeProto] = {}
        for node in self.graph.node:
            for out in node.output:
                if out:
                    self.producers[out] = node

    # -- queries ---------------------------------------------------------------------------
    def producer(self, name: str) -> NodeProto | None:
        return self.producers.get(name)

    def rank(self, name: str) -> int | None:
        """The rank the model declares for ``name`` (graph inputs, outputs and value_info of
        this graph and the enclosing ones; a constant's own rank), or None when unknown."""
        const, _ = self.constant(name)
        if const is not None:
            return len(const.tensor.dims) if const.tensor is not None else const.array().ndim
        scope: Scope | None = self
        while scope is not None:
            g = scope.graph
            for info in (*g.input, *g.output, *g.value_info):
                if info.name == name and info.type.HasField("tensor_type"):
                    tensor_type = info.type.tensor_type
                    return len(tensor_type.shape.dim) if tensor_type.HasField("shape") else None
            scope = scope.parent
        return None

    def consumers(self, name: str) -> list[NodeProto]:
        """The nodes of this graph that read ``name`` (not those of its subgraphs).

        From an index built on first use, once per sweep (a scope lives for one sweep): a node
        removed since, or no longer reading ``name``, is left out; a node that starts reading
        ``name`` during the sweep is seen in the next one, which :func:`run_rewrites` runs
        after any rewrite.
        """
        if self._readers is None:
            self._readers = {}
            for node in self.graph.node:
                for x in dict.fromkeys(node.input):
                    self._readers.setdefault(x, []).append(node)
        return [
            n for n in self._readers.get(name, ()) if id(n) not in self.removed and name in n.input
        ]

    def uses(self, name: str) -> int:
        """References to ``name`` anywhere in the model (node inputs, graph outputs)."""
        return self.model.uses[name]

    def constant(self, name: str) -> tuple[Constant | None, str]:
        """The constant behind ``name`` (searching enclosing graphs), or why it is not one."""
        scope: Scope | None = self
        while scope is not None:
            if name in scope.producers:
                node = scope.producers[name]
                if node.domain in DEFAULT_DOMAINS and node.op_type == "Constant":
                    t = _constant_attr_tensor(node)
                    return Constant(name, scope, t, node), ""
                if node.domain in DEFAULT_DOMAINS and node.op_type == "Identity":
                    # Exporters de-duplicate equal tensors as Identity(initializer): still a
                    # constant. Resolve from the Identity's own scope.
                    inner, why = scope.constant(node.input[0])
                    if inner is not None:
                        return inner, ""
                    return None, f"{name!r} is computed at run time (Identity of {why})"
                return None, f"{name!r} is computed at run time (by {node.op_type})"
            if name in scope.initializers:
                # From IR 4 on, an initializer that is also a graph input is only a default the
                # caller may override; before IR 4 every initializer had to be listed as input.
                if name in scope.inputs and self.model.ir_version >= 4:
                    return None, f"{name!r} is a graph input (overridable at run time)"
                return Constant(name, scope, scope.initializers[name]), ""
            if name in scope.inputs:
                return None, f"{name!r} is a graph input"
            scope = scope.parent
        return None, f"{name!r} is not defined"

    # -- edits -----------------------------------------------------------------------------
    def replace_input(
        self, node: NodeProto, index: int, array: np.ndarray | Computed, base: str
    ) -> None:
        """Make input ``index`` of ``node`` hold ``array``.

        The tensor is rewritten in place only when it is an initializer of this graph used by
        this node alone; otherwise the node gets its own new initializer and the other users
        keep the original.
        """
        old = node.input[index] if index < len(node.input) else ""
        if old and old in self.initializers and self.uses(old) == 1 and old not in self.inputs:
            self.model.store.set_array(self.initializers[old], array)
            return
        name = self.model.fresh_name(base)
        self.add_initializer(name, array)
        while len(node.input) <= index:
            node.input.append("")
        node.input[index] = name
        self.model.uses[name] += 1
        if old:
            self.release(old)

    def add_initializer(self, name: str, array: np.ndarray | Computed) -> None:
        tensor = self.graph.initializer.add()
        tensor.name = name
        tensor.data_type = np_dtype_to_tensor_dtype(array.dtype)
        self.model.store.set_array(tensor, array)
        self.initializers[name] = tensor
        if self.model.ir_version < 4 and self.parent is None:
            # IR < 4: every initializer must also be declared as a graph input.
            self.graph.input.append(
                make_tensor_value_info(name, tensor.data_type, list(array.shape))
            )
            self.inputs.add(name)

    def release(self, name: str) -> None:
        """Drop one use of ``name``; remove its constant source once nobody uses it."""
        self.model.uses[name] -= 1
        if self.model.uses[name] > 0:
            return
        del self.model.uses[name]
        scope: Scope | None = self
        while scope is not None:
            if name in scope.producers:
                node = scope.producers[name]
                if node.op_type in ("Constant", "Identity") and all(
                    self.uses(o) == 0 for o in node.output
                ):
                    scope.remove_node(node)
                    if node.op_type == "Identity":
                        scope.release(node.input[0])
                return
            if name in scope.initializers:
                tensor = scope.initializers.pop(name)
                scope.graph.initializer.remove(tensor)
                if name in scope.inputs:
                    _remove_named(scope.graph.input, name)
                    scope.inputs.discard(name)
                return
            scope = scope.parent

    def remove_node(self, node: NodeProto) -> None:
        for out in node.output:
            self.producers.pop(out, None)
        self.graph.node.remove(node)
        self.removed.add(id(node))

    def remove_value_info(self, name: str) -> None:
        _remove_named(self.graph.value_info, name)


def _remove_named(container, name: str) -> None:
    for i, item in enumerate(container):
        if item.name == name:
            del container[i]
            return


def _constant_attr_tensor(node: NodeProto) -> TensorProto | None:
    for attr in node.attribute:
        if attr.name == "value" and attr.HasField("t"):
            return attr.t
    return None


def _constant_attr_value(node: NodeProto | None) -> np.ndarray:
    assert node is not None
    for attr in node.attribute:
        if attr.name == "value_float":
            return np.array(attr.f, np.float32)
        if attr.name == "value_floats":
            return np.array(attr.floats, np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, np.int64)
        if attr.name == "value_ints":
            return np.array(attr.ints, np.int64)
    raise ValueError(f"Constant node {node.name!r} holds no numeric value")


def _graphs(graph: GraphProto) -> Iterator[GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _graphs(attr.g)
            for g in attr.graphs:
                yield from _graphs(g)


def _scopes(scope: Scope) -> Iterator[Scope]:
    yield scope
    for node in list(scope.graph.node):
        label = node.name or node.op_type
        for attr in node.attribute:
            subgraphs = [attr.g] if attr.HasField("g") else list(attr.graphs)
            for i, g in enumerate(subgraphs):
                suffix = attr.name if len(subgraphs) == 1 else f"{attr.name}[{i}]"
                yield from _scopes(Scope(g, scope.model, scope, f"{scope.path}/{label}.{suffix}"))


def count_nodes(graph: GraphProto) -> int:
    return sum(len(g.node) for g in _graphs(graph))


def attr(node: NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return get_attribute_value(a)
    return default


def run_rewrites(
    model: ModelProto,
    store: TensorStore,
    rules: Sequence[Rule],
    name: str,
    version: str,
) -> PassReport:
    """Apply ``rules`` to every graph until nothing more matches; report what happened."""
    started = time.perf_counter()
    report = PassReport(name, version, nodes_before=count_nodes(model.graph))
    ctx = ModelContext(model, store)
    declined: dict[tuple[str, str], Skipped] = {}
    changed = True
    while changed:
        changed = False
        for scope in _scopes(Scope(model.graph, ctx, None, "main")):
            for node in list(scope.graph.node):
                if id(node) in scope.removed:  # removed by an earlier rewrite this sweep
                    continue
                anchored = [r for r in rules if r.anchor == node.op_type]
                if not anchored or node.domain not in DEFAULT_DOMAINS:
                    continue
                key = (scope.path, node_key(node))
                outcome = _apply(node, scope, anchored)
                if isinstance(outcome, Fused):
                    report.fused.append(outcome)
                    declined.pop(key, None)  # declined in an earlier sweep, fused since
                    changed = True
                else:
                    declined[key] = Skipped(node.op_type, node_key(node), scope.path, outcome)
    report.skipped = list(declined.values())
    report.nodes_after = count_nodes(model.graph)
    report.seconds = time.perf_counter() - started
    return report


def _apply(node: NodeProto, scope: Scope, rules: Sequence[Rule]) -> Fused | str:
    """Rewrite ``node`` with the first rule that matches and accepts, or say why none did."""
    reasons: list[str] = []
    for rule in rules:
        match = rule.match(node, scope)
        if match is None:
            continue
        verdict = rule.check(match, scope)
        if not isinstance(verdict, str):
            return rule.rewrite(match, scope, verdict)
        if verdict not in reasons:
            reasons.append(verdict)
    # Every rule that matched and declined says why (a BatchNormalization between a Conv and a
    # Conv is matched by the fold into either), first matched first.
    return "; ".join(reasons) if reasons else rules[0].unmatched(node, scope, rules)


def node_key(node: NodeProto) -> str:
    return node.name or f"{node.op_type}->{node.output[0] if node.output else '?'}"
