"""Distil a trained ResNet into a neural ODE that runs at any step count (resumable).

The settings, the device, the architecture and the output paths are checked before anything is
trained; a bad value, file or path ends the command with one line naming it, and status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from torch import nn

from resode_lightning.cli._common import add_architecture
from resode_lightning.cli.bench import check_device, device_name
from resode_lightning.core.io.atomic import writable_target
from resode_lightning.core.io.checkpoint import load_state_dict_file
from resode_lightning.core.io.errors import CheckpointError
from resode_lightning.core.odeform import load_into, strip_prefix
from resode_lightning.data.base import ImageDataModule
from resode_lightning.export.anytime import accuracy_vs_steps
from resode_lightning.export.distill import MAX_LR, check_settings
from resode_lightning.export.serialization import save_neural_ode
from resode_lightning.lit.classifier import build_backbone
from resode_lightning.lit.distillation import distill_depth

HELP = "fine-tune a trained ResNet into a neural ODE that runs at any number of steps"
RESERVED = {
    "torchvision": ("num_classes",),
    "ode_resnet": ("num_classes", "in_channels"),
    "timm": ("num_classes", "in_chans", "pretrained"),
    "user": (),
}
"""Builder arguments set from ``--data``, per family of ``--arch``."""
BUILD_ERRORS = (
    TypeError,
    ValueError,
    AttributeError,
    KeyError,
    IndexError,
    ArithmeticError,
    RuntimeError,
)
"""What a builder (ours, torchvision's, timm's, torch's layers) raises for keyword arguments it
cannot use."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_architecture(parser, inferred=False)
    parser.add_argument(
        "--weights", required=True, help="trained state dict (.pth, Lightning .ckpt, .safetensors)"
    )
    parser.add_argument(
        "--data", required=True, help="'digits' (bundled) or an image folder (see resode fit)"
    )
    parser.add_argument("--out", required=True, help="output neural ODE file (save_neural_ode)")
    parser.add_argument(
        "--checkpoint",
        help="progress file: a Lightning checkpoint written after every epoch, resumed from "
        "when present (default: OUT.distill)",
    )
    parser.add_argument("--image-size", type=int, default=32, help="image side (default 32)")
    parser.add_argument(
        "--channels", type=int, default=1, choices=(1, 3), help="digits channels (default 1)"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--steps",
        type=_step,
        nargs="+",
        default=[1.0, 0.5, 0.25],
        help="step counts trained on every batch: fractions of each stage's depth or ints",
    )
    parser.add_argument(
        "--step-weights",
        type=float,
        nargs="+",
        help="weight of each step count's loss, in the order of --steps (default: equal)",
    )
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--knots", type=int, help="fit each stage's path at this many knots first")
    parser.add_argument(
        "--lr",
        type=float,
        default=1e-4,
        help=f"AdamW peak learning rate, in (0, {MAX_LR:g}] (default 1e-4; ODE-ResNets: 1e-3)",
    )
    parser.add_argument(
        "--warmup", type=float, default=0.0, help="share of the steps with a linear lr warm-up"
    )
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--label-weight", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0, help="seed of the data split")
    parser.add_argument(
        "--device", type=device_name, default="cpu", help="cpu or cuda[:N] (default cpu)"
    )
    parser.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar"
    )


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    checkpoint = args.checkpoint or f"{args.out}.distill"
    _check_arguments(args, checkpoint)
    data = _data(args)
    data.setup("fit")
    source = _source(args, data).to(args.device)
    if Path(checkpoint).is_file():
        print(f"resuming from {checkpoint}")
    model = distill_depth(
        source,
        data.train_dataloader(),
        steps=args.steps,
        step_weights=args.step_weights,
        epochs=args.epochs,
        knots=args.knots,
        lr=args.lr,
        warmup=args.warmup,
        temperature=args.temperature,
        label_weight=args.label_weight,
        checkpoint=checkpoint,
        device=args.device,
        progress=args.progress,
    )
    save_neural_ode(model, args.out)
    rows = accuracy_vs_steps(
        model, data.val_dataloader(), sorted(set(args.steps), reverse=True), reference=source
    )
    print(f"{'setting':>10} {'steps':>20} {'accuracy':>9} {'latency':>11} {'ratio':>6}")
    for row in rows:
        steps = "source" if row["steps"] is None else "/".join(map(str, row["steps"].values()))
        print(
            f"{row['setting']:>10} {steps:>20} {100 * row['accuracy']:8.1f}% "
            f"{row['latency_ms']:8.2f} ms {row['latency_ratio']:6.2f}"
        )
    print(
        f"distilled {args.arch.spec} in {time.perf_counter() - started:.0f} s (validation split "
        f"above); wrote {args.out}; choose a budget with resode_lightning.set_steps"
    )
    return 0


def _check_arguments(args: argparse.Namespace, checkpoint: str) -> None:
    """Refuse, before any work, settings out of range, a device this machine lacks, an unknown
    architecture and output paths that cannot be written.

    Raises:
        ValueError, OSError: naming the argument and what to do.
    """
    check_settings(
        steps=args.steps,
        step_weights=args.step_weights,
        epochs=args.epochs,
        lr=args.lr,
        warmup=args.warmup,
        weight_decay=0.0,
        temperature=args.temperature,
        label_weight=args.label_weight,
    )
    check_device(args.device)
    out, progress = writable_target(args.out), writable_target(checkpoint)
    if os.path.realpath(out) == os.path.realpath(progress):
        raise ValueError(
            f"--checkpoint {checkpoint} is the --out file; give the progress file another path"
        )


def _step(text: str) -> int | float:
    value = json.loads(text)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise argparse.ArgumentTypeError(f"a step count must be an int or a fraction, got {text!r}")
    return value


def _data(args: argparse.Namespace) -> ImageDataModule:
    from resode_lightning.data import DigitsDataModule, ImageFolderDataModule

    if args.data == "digits":
        return DigitsDataModule(
            image_size=args.image_size,
            channels=args.channels,
            batch_size=args.batch_size,
            seed=args.seed,
        )
    return ImageFolderDataModule(
        args.data, image_size=args.image_size, batch_size=args.batch_size, seed=args.seed
    )


def _source(args: argparse.Namespace, data: ImageDataModule) -> nn.Module:
    """The trained network named by ``--arch``, loaded from ``--weights``, in eval mode.

    Raises:
        ValueError: ``--arch-kwargs`` sets what ``--data`` decides (the number of classes,
            the input channels), or the builder refuses them; the message names them.
        CheckpointError, OSError: ``--weights`` is missing, unreadable or does not fit.
    """
    reserved = sorted(set(args.arch_kwargs) & set(RESERVED[args.arch.family]))
    if reserved:
        raise ValueError(
            f"--arch-kwargs sets {', '.join(reserved)}, which --data decides; remove it"
        )
    try:
        return _build(args, data).eval()
    except CheckpointError:
        raise
    except BUILD_ERRORS as error:
        raise ValueError(
            f"--arch {args.arch.spec} cannot be built with --arch-kwargs "
            f"{json.dumps(args.arch_kwargs)}: {error}"
        ) from None


def _build(args: argparse.Namespace, data: ImageDataModule) -> nn.Module:
    """``--arch`` built with ``--arch-kwargs`` for ``data``, loaded from ``--weights``."""
    if args.arch.family in ("timm", "user"):
        sizes = {"num_classes": data.num_classes, "in_chans": data.channels}
        model = args.arch.call(**args.arch_kwargs, **(sizes if args.arch.family == "timm" else {}))
        state = load_state_dict_file(args.weights)
        return load_into(model, strip_prefix(state, model))
    with torch.random.fork_rng():
        return build_backbone(
            args.arch.spec, args.arch_kwargs, data.num_classes, data.channels, args.weights
        )
