"""Adapters read from a block's own code: ``post(x + branch(x))`` found in its ``torch.fx`` graph.

A block of a type nobody registered is traced with ``torch.fx``, its own ``forward`` only (its
submodules are leaves: their code is not followed, their hooks do not run). When its output is
a chain of parameter-free elementwise maps applied to a sum of its input and something computed from
that input, the block is residual with an identity skip: the sum's other term is the branch,
the chain the post map. The graph also tells the affine layer ending the branch (through
multiplications by constants), and which convs feed only a BatchNorm (the pairs to fold).
Every inferred adapter is verified on a probe like a registered one before it is used
(:func:`~resode_lightning.core.verification.verify_block`); a block whose graph does not show
this shape, or whose trace fails, is no block to the package (and registering it stays
possible).
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from resode_lightning.core.blocks import (
    BlockAdapter,
    BlockAdapterError,
    LastLayer,
    Pairs,
    is_plain_conv,
)
from resode_lightning.core.registry import INFERENCE
from resode_lightning.core.step import ODEStep
from resode_lightning.core.verification import probe_copy, runnable_input, verify_block

_ADDS = {operator.add, operator.iadd, torch.add}
_ACTIVATIONS = {F.relu, torch.relu, F.relu6, F.gelu, F.silu, F.elu, F.leaky_relu, F.hardswish}
_ACTIVATION_METHODS = {"relu", "relu_", "sigmoid", "tanh"}
_SCALES = {operator.mul, torch.mul, operator.truediv}
_AFFINE = (_BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.Linear, nn.modules.conv._ConvNd, ODEStep)


class ChildrenAsLeaves(fx.Tracer):
    """Traces one module's own ``forward``: every submodule call is a leaf (its code is not
    followed and its hooks do not run)."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        # an identity (an empty Sequential: option-A shortcuts) is followed, to the input itself
        return not (
            isinstance(module, nn.Identity) or module.__class__ is nn.Sequential and not module
        )


@dataclass(frozen=True)
class BlockGraph:
    """What a block's graph says: its branch and post map as code, its layers by path."""

    branch: _Code
    post: _Code | None
    post_layer: str | None
    last_layer: str | None
    pairs: Pairs


class _Code:
    """A function ``f(block, x)`` generated from a graph whose attributes are read on ``block``
    (so one code serves every block of the same structure)."""

    _compiled: dict[str, Callable] = {}

    def __init__(self, graph: fx.Graph) -> None:
        self.source = graph.python_code(root_module="self").src
        if self.source not in _Code._compiled:
            namespace = dict(graph.python_code(root_module="self").globals)
            exec(compile(self.source, "<resode inferred block>", "exec"), namespace)
            _Code._compiled[self.source] = namespace["forward"]
        self.function = _Code._compiled[self.source]

    def __call__(self, block: nn.Module, x: Tensor) -> Tensor:
        return self.function(block, x)


class _Post:
    """The post map of one block: ``x -> post(block, x)``, equal (by repr) for equal code."""

    def __init__(self, code: _Code, block: nn.Module) -> None:
        self.code = code
        self.block = block

    def __call__(self, x: Tensor) -> Tensor:
        return self.code(self.block, x)

    def __repr__(self) -> str:
        return f"inferred post map {hash(self.code.source):x}"


_GRAPHS: weakref.WeakKeyDictionary[nn.Module, BlockGraph | None] = weakref.WeakKeyDictionary()


def block_graph(block: nn.Module) -> BlockGraph | None:
    """The residual structure of ``block`` read from its graph, or ``None`` (cached per block)."""
    if block not in _GRAPHS:
        _GRAPHS[block] = _read(block)
    return _GRAPHS[block]


def forget_graph(block: nn.Module) -> None:
    """Read ``block``'s graph again next time (its code reads other attributes now)."""
    _GRAPHS.pop(block, None)


def _read(block: nn.Module) -> BlockGraph | None:
    module = type(block).__module__
    if module.startswith(("torch.", "resode_lightning.")) or not any(
        True for _ in block.children()
    ):
        return None
    try:
        graph = ChildrenAsLeaves().trace(block)
    except Exception:  # untraceable code (data-dependent control flow, ...): not inferred
        return None
    inputs = [node for node in graph.nodes if node.op == "placeholder"]
    output = next(node for node in graph.nodes if node.op == "output")
    if len(inputs) != 1 or not isinstance(output.args[0], fx.Node):
        return None
    x = inputs[0]
    node, post_nodes = output.args[0], []
    while not _is_skip_sum(node, x):
        if not _is_post_map(node, block) or len(node.args[0].users) != 1:
            return None
        post_nodes.append(node)
        node = node.args[0]
    branch = next(arg for arg in node.args if arg is not x)
    if node in _ancestors(branch) or len(node.users) != 1 and post_nodes:
        return None
    return BlockGraph(
        branch=_Code(_subgraph(x, [branch], branch)),
        post=_Code(_subgraph(node, list(reversed(post_nodes)), output.args[0]))
        if post_nodes
        else None,
        post_layer=post_nodes[0].target
        if len(post_nodes) == 1 and post_nodes[0].op == "call_module"
        else None,
        last_layer=_last_layer(branch, block),
        pairs=_pairs(graph, block),
    )


def _is_skip_sum(node: fx.Node, x: fx.Node) -> bool:
    if node.kwargs or len(node.args) != 2 or not all(isinstance(a, fx.Node) for a in node.args):
        return False
    adds = (node.op == "call_function" and node.target in _ADDS) or (
        node.op == "call_method" and node.target in ("add", "add_")
    )
    return adds and (node.args[0] is x) != (node.args[1] is x)


def _is_post_map(node: fx.Node, block: nn.Module) -> bool:
    """A parameter-free elementwise map of one tensor (an activation)."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if any(isinstance(a, fx.Node) for a in [*node.args[1:], *node.kwargs.values()]):
        return False
    if node.op == "call_module":
        layer = block.get_submodule(node.target)
        stateless = not any(True for _ in layer.parameters()) and not any(
            True for _ in layer.buffers()
        )
        return stateless and type(layer).__module__.startswith("torch.nn.modules.activation")
    if node.op == "call_function":
        return node.target in _ACTIVATIONS
    return node.op == "call_method" and node.target in _ACTIVATION_METHODS


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    pending = [node]
    while pending:
        current = pending.pop()
        for parent in current.all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                pending.append(parent)
    return seen


def _subgraph(start: fx.Node, nodes: list[fx.Node], result: fx.Node) -> fx.Graph:
    """A graph of one input (in place of ``start``) computing ``result``: ``nodes`` and, for a
    branch, every node it depends on."""
    needed = _ancestors(result) | {result} if start.op == "placeholder" else set(nodes)
    graph = fx.Graph()
    env = {start: graph.placeholder("x")}
    for node in start.graph.nodes:
        if node in needed and node not in env and node.op != "placeholder":
            env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[result])
    return graph


def _last_layer(branch: fx.Node, block: nn.Module) -> str | None:
    """The affine layer the branch ends with, through multiplications by constants or gains."""
    node = branch
    while node.op == "call_function" and node.target in _SCALES and len(node.args) == 2:
        tensors = [a for a in node.args if isinstance(a, fx.Node) and a.op != "get_attr"]
        if len(tensors) != 1 or (
            node.target is operator.truediv and node.args[0] is not tensors[0]
        ):
            return None
        node = tensors[0]
    if node.op != "call_module":
        return None
    target, layer = node.target, block.get_submodule(node.target)
    while type(layer) is nn.Sequential and len(layer):  # its output is its last layer's
        name, layer = list(layer.named_children())[-1]
        target = f"{target}.{name}"
    if not isinstance(layer, _AFFINE) or getattr(layer, "weight", True) is None:
        return None
    if isinstance(layer, nn.modules.conv._ConvNd) and not is_plain_conv(layer):
        return None
    return target


def _pairs(graph: fx.Graph, block: nn.Module) -> Pairs:
    """``(conv, norm)`` paths where a plain conv's only use is a BatchNorm reading only it."""
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not is_plain_conv(block.get_submodule(node.target)):
            continue
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_module" and len(users[0].args) == 1:
            norm = block.get_submodule(users[0].target)
            inner = norm.layer if isinstance(norm, ODEStep) else norm
            if isinstance(inner, _BatchNorm):
                pairs.append((node.target, users[0].target))
    return tuple(pairs)


def _branch(block: nn.Module, x: Tensor) -> Tensor:
    return block_graph(block).branch(block, x)


def _post(block: nn.Module) -> Callable[[Tensor], Tensor] | None:
    graph = block_graph(block)
    if graph.post is None:
        return None
    if graph.post_layer is not None:  # one activation layer: the layer itself, as registered
        return block.get_submodule(graph.post_layer)
    return _Post(graph.post, block)


def _last(block: nn.Module) -> nn.Module | None:
    name = block_graph(block).last_layer
    return None if name is None else block.get_submodule(name)


def _is_identity_skip(block: nn.Module) -> bool:
    return block_graph(block) is not None


def _pairs_of(block: nn.Module) -> Pairs:
    return block_graph(block).pairs


INFERRED = BlockAdapter(
    branch=_branch,
    last_layer=LastLayer(_last),
    post=_post,
    is_identity_skip=_is_identity_skip,
    step_attribute=None,
    conv_bn_pairs=_pairs_of,
)
"""The adapter of every block whose structure :func:`block_graph` reads: its functions read
each block's own graph."""


REASONS: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()
"""Why a block's adapter could not be inferred (for the no-stage message), by block."""


def infer_adapter(block: nn.Module) -> BlockAdapter | None:
    """:data:`INFERRED` when ``block``'s graph shows a residual block that passes the probe
    checks of :func:`~resode_lightning.core.verification.verify_block`, else ``None`` (the
    reason is kept in :data:`REASONS`)."""
    graph = block_graph(block)
    if graph is None:
        return None
    if runnable_input(probe_copy(block)) is None:
        REASONS[block] = "it did not run on a probe input of the width of its layers"
        _GRAPHS[block] = None
        return None
    try:
        verify_block(block, INFERRED)
    except BlockAdapterError as error:
        REASONS[block] = f"the structure read from its graph failed a probe check: {error}"
        _GRAPHS[block] = None
        return None
    return INFERRED


INFERENCE.append(infer_adapter)


def loop_skip_owner(container: nn.Module) -> str | None:
    """The list of ``container``'s children whose outputs its ``forward`` adds to their own
    inputs (a skip written in the container's loop, ``x = x + f(x) / L``), when it does so for at
    least two of them; else ``None``."""
    if type(container).__module__.startswith(("torch.", "resode_lightning.")):
        return None
    try:
        graph = ChildrenAsLeaves().trace(container)
    except Exception:  # untraceable code: nothing to say
        return None
    owners: dict[str, int] = {}
    for node in graph.nodes:
        if node.op != "call_module" or "." not in node.target or not node.args:
            continue
        out = node
        while len(out.users) == 1 and _is_constant_scale(user := next(iter(out.users)), out):
            out = user
        if any(_is_skip_sum(user, node.args[0]) for user in out.users):
            owner = node.target.rsplit(".", 1)[0]
            owners[owner] = owners.get(owner, 0) + 1
    return next((owner for owner, count in owners.items() if count >= 2), None)


def _is_constant_scale(node: fx.Node, value: fx.Node) -> bool:
    """``node`` multiplies or divides ``value`` by something that is not a graph value."""
    scales = (node.op == "call_function" and node.target in _SCALES) or (
        node.op == "call_method" and node.target in ("mul", "div")
    )
    others = [a for a in node.args if a is not value]
    return scales and len(others) == 1 and not isinstance(others[0], fx.Node)


def graph_pairs(block: nn.Module) -> Pairs:
    """The ``(conv, norm)`` pairs that ``block``'s own graph shows (a plain conv whose only use
    is a BatchNorm), or none when torch.fx cannot trace its ``forward``."""
    graph = block_graph(block)
    if graph is not None:
        return graph.pairs
    try:
        traced = ChildrenAsLeaves().trace(block)
    except Exception:  # untraceable code: nothing folds
        return ()
    return _pairs(traced, block)
