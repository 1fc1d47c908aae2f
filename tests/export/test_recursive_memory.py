"""gradient="recursive" holds a bounded memory whatever the steps: no autograd graph, stored
states or weights bound per step until backward."""

from __future__ import annotations

import torch
from torch import Tensor

from resode_lightning.apps.memory_benchmark import allocated_step_bytes, stage_module

WIDTH, SIZE, BATCH = 8, 8, 2
STATE_BYTES = WIDTH * SIZE * SIZE * BATCH * 4
WEIGHT_BYTES = WIDTH * WIDTH * 9 * 4
"""One 3x3 convolution's weights: each step of the exported stage binds two."""


def graph_nodes(output: Tensor) -> int:
    """The autograd nodes reachable from ``output``."""
    seen, pending = set(), [output.grad_fn]
    while pending:
        node = pending.pop()
        if node is not None and node not in seen:
            seen.add(node)
            pending.extend(next_node for next_node, _ in node.next_functions)
    return len(seen)


def test_recursive_forward_leaves_the_same_autograd_graph_at_8_and_64_steps():
    x = torch.randn(BATCH, WIDTH, SIZE, SIZE).relu().requires_grad_(True)
    counts = [graph_nodes(stage_module("recursive", steps, WIDTH)(x)) for steps in (8, 64)]
    assert counts[0] == counts[1]


def test_recursive_peak_allocated_bytes_do_not_grow_with_the_steps():
    """56 more steps: at most two more states (the schedule's last free slot and one transient
    state of a recomputation), where one state or one weight copy per step would add 56."""
    kwargs = {"width": WIDTH, "size": SIZE, "batch": BATCH}
    few, many = (allocated_step_bytes("recursive", steps, **kwargs) for steps in (8, 64))
    backprop = allocated_step_bytes("backprop", 64, **kwargs)
    assert many - few <= 2 * STATE_BYTES < 56 * min(STATE_BYTES, 2 * WEIGHT_BYTES)
    assert backprop - few > 56 * STATE_BYTES  # the measure sees what backprop stores per step
