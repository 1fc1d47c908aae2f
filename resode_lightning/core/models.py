"""ODE-ResNets to train from scratch: exact Euler steps with smooth, tied or i.i.d. init."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from resode_lightning.core.odeform import convert_stage
from resode_lightning.core.registry import register_block
from resode_lightning.core.stages import find_stages

Init = Literal["tied", "smooth", "iid"]
INITS: tuple[str, ...] = ("tied", "smooth", "iid")
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU}


class PreActBlock(nn.Module):
    """One explicit Euler step ``x + h * F(x)`` with ``F = BN(conv(σ(BN(conv(x)))))``.

    Nothing follows the sum (the identity path is clean), so the block is an exact step of
    ``dx/dt = F(x)``. Without normalisation, ``F = conv(σ(conv(x)))`` with biases.

    Args:
        width: channels in and out.
        activation: ``"relu"`` or ``"gelu"``.
        norm: use BatchNorm after each conv.
        step: the step ``h`` (``horizon / L`` in a stage of ``L`` blocks).
    """

    def __init__(self, width: int, activation: str = "relu", norm: bool = True, step: float = 1.0):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=not norm)
        self.bn1 = nn.BatchNorm2d(width) if norm else nn.Identity()
        self.act = ACTIVATIONS[activation]()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=not norm)
        self.bn2 = nn.BatchNorm2d(width) if norm else nn.Identity()
        self.step = step

    def branch(self, x: Tensor) -> Tensor:
        return self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.step * self.branch(x)

    def extra_repr(self) -> str:
        return f"step={self.step:g}"


def _preact_last_layer(block: PreActBlock) -> nn.Module:
    return block.conv2 if isinstance(block.bn2, nn.Identity) else block.bn2


register_block(
    PreActBlock,
    branch=lambda block, x: block.step * block.branch(x),
    last_layer=_preact_last_layer,
    step_attribute="step",
    conv_bn_pairs=(("conv1", "bn1"), ("conv2", "bn2")),
)


class ODEResNet(nn.Module):
    """Stem, stages of :class:`PreActBlock` joined by strided transitions, then a linear head.

    Built by :func:`ode_resnet`; every stage is in ODE form from the start.
    """

    def __init__(
        self,
        depths: tuple[int, ...],
        widths: tuple[int, ...],
        num_classes: int,
        in_channels: int,
        stem: str,
        activation: str,
        norm: bool,
        horizon: float,
    ) -> None:
        super().__init__()
        act = ACTIVATIONS[activation]
        if stem == "cifar":
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=not norm),
                nn.BatchNorm2d(widths[0]) if norm else nn.Identity(),
                act(),
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, widths[0], 7, stride=2, padding=3, bias=not norm),
                nn.BatchNorm2d(widths[0]) if norm else nn.Identity(),
                act(),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        self.stages = nn.ModuleList()
        self.transitions = nn.ModuleList()
        for i, (depth, width) in enumerate(zip(depths, widths)):
            if i > 0:
                self.transitions.append(
                    nn.Sequential(
                        nn.Conv2d(widths[i - 1], width, 3, stride=2, padding=1, bias=not norm),
                        nn.BatchNorm2d(width) if norm else nn.Identity(),
                        act(),
                    )
                )
            self.stages.append(
                nn.Sequential(*[PreActBlock(width, activation, norm) for _ in range(depth)])
            )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)
        for stage in find_stages(self):
            convert_stage(stage, horizon, rescale=False)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for i, stage in enumerate(self.stages):
            if i > 0:
                x = self.transitions[i - 1](x)
            x = stage(x)
        return self.fc(torch.flatten(self.pool(x), 1))


LIMITS = {"num_classes": 100_000, "width": 4096, "depth": 1024, "blocks": 4096, "in_channels": 64}
"""The largest architecture a file or a checkpoint may declare: an ``ode_resnet``'s depth per
stage, width, blocks in all, input channels, and any model's classes (checked before anything is
built)."""


def check_ode_resnet_arguments(arguments: dict, *, field: str = "") -> None:
    """Raise ``ValueError`` naming the argument (after ``field``) unless :func:`ode_resnet`
    with ``arguments`` (``depths``, ``widths``, ``num_classes``, ``in_channels``, ``stem``,
    ``activation``, ``norm``) is within :data:`LIMITS`."""
    depths, widths = arguments.get("depths"), arguments.get("widths")
    for name, values, limit in (
        ("depths", depths, LIMITS["depth"]),
        ("widths", widths, LIMITS["width"]),
    ):
        if not (isinstance(values, list) and values and all(_count(v, limit) for v in values)):
            raise ValueError(f"{field}{name} must be a non-empty list of ints in [1, {limit}]")
    if len(depths) != len(widths) or sum(depths) > LIMITS["blocks"]:
        raise ValueError(
            f"{field}depths and widths must have one entry per stage and at most "
            f"{LIMITS['blocks']} blocks in all"
        )
    for name in ("num_classes", "in_channels"):
        if not _count(arguments.get(name), LIMITS[name]):
            raise ValueError(
                f"{field}{name} must be an int in [1, {LIMITS[name]:,}], got "
                f"{arguments.get(name)!r}"
            )
    choices = {
        "stem": ("cifar", "imagenet"),
        "activation": tuple(ACTIVATIONS),
        "norm": (True, False),
    }
    for name, allowed in choices.items():
        value = arguments.get(name)
        if value not in allowed or isinstance(value, int) != (name == "norm"):
            raise ValueError(f"{field}{name} must be one of {allowed}, got {value!r}")


def _count(value: object, limit: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= limit


def ode_resnet(
    *,
    depths: tuple[int, ...] | list[int] = (8, 8, 8),
    widths: tuple[int, ...] | list[int] = (16, 32, 64),
    num_classes: int = 10,
    in_channels: int = 3,
    stem: Literal["cifar", "imagenet"] = "cifar",
    activation: Literal["relu", "gelu"] = "relu",
    norm: bool = True,
    horizon: float = 1.0,
    init: Init = "tied",
    seed: int | None = None,
) -> ODEResNet:
    """A pre-activation ResNet whose stages are neural ODEs discretised by explicit Euler.

    Args:
        depths: number of blocks ``L`` of each stage (each at least 2).
        widths: channels of each stage.
        num_classes: outputs of the linear head.
        in_channels: channels of the input images.
        stem: ``"cifar"`` (3x3 conv) or ``"imagenet"`` (7x7 stride-2 conv and max-pool).
        activation: ``"relu"`` or ``"gelu"`` inside the branches.
        norm: BatchNorm in the branches, stem and transitions.
        horizon: time each stage integrates over; each block steps ``horizon / L``.
        init: ``"tied"`` (one block's weights in every block, last affine layer of each branch
            zeroed: the smooth start of Marion et al.), ``"smooth"`` (``θ_k = θ(k / L)`` for a
            random smooth ``θ``) or ``"iid"`` (PyTorch's default, independent per block).
        seed: seed for the initialisation (the global RNG is left untouched when given).

    Returns:
        The model, in ODE form.

    Example::

        >>> model = ode_resnet(depths=(16, 16), widths=(16, 32), init="tied")
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    depths, widths = tuple(depths), tuple(widths)
    if not depths or len(depths) != len(widths):
        raise ValueError(
            f"depths and widths must be non-empty and of equal length, got {depths}, {widths}"
        )
    if any(not isinstance(d, int) or d < 2 for d in depths):
        raise ValueError(f"every stage needs at least 2 blocks to be an ODE, got depths={depths}")
    if any(not isinstance(w, int) or w < 1 for w in widths):
        raise ValueError(f"widths must be positive ints, got {widths}")
    if stem not in ("cifar", "imagenet"):
        raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if not 0 < horizon < math.inf:
        raise ValueError(f"horizon must be positive and finite, got {horizon!r}")
    with torch.random.fork_rng(enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        model = ODEResNet(depths, widths, num_classes, in_channels, stem, activation, norm, horizon)
        for stage in model.stages:
            if init == "tied":
                _tie(list(stage))
            elif init == "smooth":
                _smooth(list(stage))
    return model


@torch.no_grad()
def _tie(blocks: list[PreActBlock]) -> None:
    last = _preact_last_layer(blocks[0])
    nn.init.zeros_(last.weight)
    if last.bias is not None:
        nn.init.zeros_(last.bias)
    for block in blocks[1:]:
        block.load_state_dict(blocks[0].state_dict())


@torch.no_grad()
def _smooth(blocks: list[PreActBlock], components: int = 3) -> None:
    """``θ(t) = (θ_0 + Σ_j √2 c_j cos(π j t + φ_j)) / √(1 + J)``, each draw at the default scale.

    Conv weights only; norm layers keep their default (constant) affine parameters.
    """
    depth = len(blocks)
    times = torch.arange(depth, dtype=torch.float64) / depth
    for name, base in blocks[0].named_parameters():
        if base.dim() < 2:
            continue
        base = base.clone()
        draws = []
        for _ in range(components):
            draw = torch.empty_like(base)
            nn.init.kaiming_uniform_(draw, a=math.sqrt(5))  # nn.Conv2d's default
            draws.append(draw)
        phases = torch.rand(components, dtype=torch.float64) * 2 * math.pi
        for k, block in enumerate(blocks):
            value = base.clone()
            for j, draw in enumerate(draws, start=1):
                value += (
                    math.sqrt(2)
                    * math.cos(math.pi * j * float(times[k]) + float(phases[j - 1]))
                    * draw
                )
            block.get_parameter(name).copy_(value / math.sqrt(1 + components))


TORCHVISION_RESNETS: tuple[str, ...] = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "wide_resnet50_2",
    "wide_resnet101_2",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
)


def torchvision_resnet(arch: str, *, num_classes: int = 1000, **kwargs: object) -> nn.Module:
    """A torchvision ResNet by name, randomly initialised (no weights are downloaded).

    Raises:
        ValueError: ``arch`` is not one of :data:`TORCHVISION_RESNETS`.
    """
    import torchvision

    if arch not in TORCHVISION_RESNETS:
        raise ValueError(
            f"unknown architecture {arch!r}; choose one of {', '.join(TORCHVISION_RESNETS)}"
        )
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
