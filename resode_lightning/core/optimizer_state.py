"""Optimizer state carried across a rescale of the parameters it is kept for.

A parameter multiplied by ``c`` while the network computes the same function (the ODE-form
rescale multiplies by the gain ``L / horizon``) has gradients ``1 / c`` times the old ones, so
the optimizer's running statistics of its gradients must be carried too.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

GRADIENT_ORDERS: dict[type[torch.optim.Optimizer], dict[str, int]] = {
    torch.optim.SGD: {"momentum_buffer": 1},
    torch.optim.Adam: {"step": 0, "exp_avg": 1, "exp_avg_sq": 2, "max_exp_avg_sq": 2},
    torch.optim.AdamW: {"step": 0, "exp_avg": 1, "exp_avg_sq": 2, "max_exp_avg_sq": 2},
    torch.optim.NAdam: {"step": 0, "mu_product": 0, "exp_avg": 1, "exp_avg_sq": 2},
    torch.optim.RAdam: {"step": 0, "exp_avg": 1, "exp_avg_sq": 2},
}
"""Optimizers whose per-parameter state :func:`rescale_optimizer_state` can rescale: for each,
every state key and the power of the gradient it is a running statistic of (0: not scaled).
Types match exactly: a subclass may keep other state under the same keys."""


def rescale_optimizer_state(
    optimizer: torch.optim.Optimizer, factors: Mapping[Tensor, float]
) -> None:
    """Carry the state ``optimizer`` holds for parameters multiplied by a factor, in place.

    A parameter multiplied by ``c`` while computing the same function (the ODE-form rescale,
    ``c = L / horizon``) has gradients ``1 / c`` times the old ones. Each state entry that is a
    running statistic of the ``k``-th power of the gradient (see :data:`GRADIENT_ORDERS`) is
    multiplied by ``c ** -k``: the state the optimizer would hold had it seen the same gradients
    through the new parametrisation. SGD's momentum and Adam's first moment are divided by ``c``,
    Adam's second moments by ``c ** 2``, step counts are kept. L2 weight decay added to the
    gradient is carried with it, as a gradient. Parameters without state are left alone.

    Args:
        optimizer: the optimizer holding state for some of the parameters.
        factors: ``{parameter: c}`` for the parameters that were multiplied.

    Raises:
        ValueError: the optimizer holds state for one of the parameters, but its type or a state
            key is not in :data:`GRADIENT_ORDERS`; nothing is modified.
    """
    params = [p for group in optimizer.param_groups for p in group["params"] if p in factors]
    stateful = [p for p in params if optimizer.state.get(p)]
    if not stateful:
        return
    orders = GRADIENT_ORDERS.get(type(optimizer))
    unknown = sorted({key for p in stateful for key in optimizer.state[p]} - set(orders or {}))
    if orders is None or unknown:
        raise ValueError(
            f"cannot rescale the state {type(optimizer).__name__} holds for {len(stateful)} "
            f"rescaled parameter(s): unknown state key(s) {unknown} (the state of "
            f"{', '.join(cls.__name__ for cls in GRADIENT_ORDERS)} can be rescaled)"
        )
    with torch.no_grad():
        for p in stateful:
            for key, value in optimizer.state[p].items():
                if orders[key] and isinstance(value, Tensor):
                    value.mul_(factors[p] ** -orders[key])
