"""Coverage of the ResNet zoo: every ResNet-family arch of the installed timm and torchvision.

The archs: timm's ResNet families (resnet, resnetv2, senet, sknet, res2net, resnest, regnet,
byobnet, cspnet, nfnet, dla), a ``features_only=True`` backbone of each timm family;
torchvision's classification ResNets and RegNets, the ResNet backbones of its detection and
segmentation models (Faster/Mask/Keypoint R-CNN, RetinaNet, FCOS, DeepLabV3, FCN), its video
ResNets and its quantizable ResNets (``quantize=False``).

For each arch (random weights, every BatchNorm with random statistics and affine parameters, as
a trained net has; eval mode, float32, batch 2 at 64x64, video 2 x 4 frames at 32x32), out of
the box, with no registration:

- stages: the residual stages found and their depths;
- self: the arch's own float32 error against float64 (a floor no conversion can beat);
- conversion: max |to_ode_form(m)(x) - m(x)| / max |m(x)|;
- export: the same for ``export_neural_ode(m)`` (Euler at each stage's depth);
- monitor: the monitor's metric table on every stage is finite;
- resample: ``resample_depth`` of the first stage to twice its depth runs and stays finite;
- f64: for an arch whose conversion or export is more than 1e-5 away in float32, the same
  errors in float64, where rounding does not hide what the package computes; the status says
  whether the arch's own float32 floor is above 1e-5 (deep attention nets whose random norms
  make them chaotic) or the float64 errors are within 1e-10 (float32 rounding).

An arch passes when conversion and export are <= 1e-5. Archs whose parameter count exceeds
``--max-params`` are skipped with the reason. Writes results/zoo.{json,md}.

    python benchmarks/zoo.py [--max-params 150e6] [--timeout 300] [--only resnet,regnet]
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import time
import traceback

import timm
import torch
import torchvision.models as tvm
from _common import RESULTS, environment, markdown_table
from torch import nn

from resode_lightning import export_neural_ode, find_stages, resample_depth, to_ode_form
from resode_lightning.core.io.atomic import atomic_write_text
from resode_lightning.core.metrics import METRICS, metric_table
from resode_lightning.core.parameters import stage_tensors
from resode_lightning.testing import randomize_norms

TIMM_FAMILIES = (
    "resnet",
    "resnetv2",
    "senet",
    "sknet",
    "res2net",
    "resnest",
    "regnet",
    "byobnet",
    "cspnet",
    "nfnet",
    "dla",
)
FEATURES_ONLY = (
    "resnet50d",
    "resnetv2_50",
    "seresnext26d_32x4d",
    "skresnet18",
    "res2net50_26w_4s",
    "resnest26d",
    "regnety_008",
    "resnet51q",
    "cspresnet50",
    "nf_resnet50",
    "dla34",
)
"""One timm arch per family, built with ``features_only=True`` (a multi-scale backbone)."""
TORCHVISION_BACKBONES = {
    "detection": (
        "fasterrcnn_resnet50_fpn",
        "fasterrcnn_resnet50_fpn_v2",
        "maskrcnn_resnet50_fpn",
        "maskrcnn_resnet50_fpn_v2",
        "keypointrcnn_resnet50_fpn",
        "retinanet_resnet50_fpn",
        "retinanet_resnet50_fpn_v2",
        "fcos_resnet50_fpn",
    ),
    "segmentation": ("deeplabv3_resnet50", "deeplabv3_resnet101", "fcn_resnet50", "fcn_resnet101"),
}
"""torchvision's task models with a ResNet body: the zoo measures their ``backbone``."""
VIDEO = ("r3d_18", "mc3_18", "r2plus1d_18")
QUANTIZABLE = ("resnet18", "resnet50", "resnext101_32x8d", "resnext101_64x4d")
TOLERANCE = 1e-5
F64_TOLERANCE = 1e-10
"""In float64, where the rounding of float32 does not hide what the package computes."""
COLUMNS = [
    "arch",
    "family",
    "stages",
    "self",
    "conversion",
    "export",
    "f64 conversion",
    "f64 export",
    "monitor",
    "resample",
]


def archs(only: set[str] | None) -> list[tuple[str, str]]:
    """``(source:arch, family)`` of every ResNet-family arch installed."""
    found = []
    for family in TIMM_FAMILIES:
        found += [(f"timm:{name}", family) for name in timm.list_models(module=family)]
    found += [(f"timm-features:{name}", "timm-features") for name in FEATURES_ONLY]
    for name in tvm.list_models(module=tvm):
        if name.startswith(("resnet", "wide_resnet", "resnext")):
            found.append((f"torchvision:{name}", "tv-resnet"))
        elif name.startswith("regnet"):
            found.append((f"torchvision:{name}", "tv-regnet"))
    for task, names in TORCHVISION_BACKBONES.items():
        found += [(f"torchvision-{task}:{name}", f"tv-{task}") for name in names]
    found += [(f"torchvision-video:{name}", "tv-video") for name in VIDEO]
    found += [(f"torchvision-quantization:{name}", "tv-quantizable") for name in QUANTIZABLE]
    return [(arch, family) for arch, family in found if only is None or family in only]


def build(arch: str) -> nn.Module:
    source, name = arch.split(":")
    if source == "timm":
        return timm.create_model(name, pretrained=False, num_classes=10)
    if source == "timm-features":
        return timm.create_model(name, pretrained=False, features_only=True)
    if source in ("torchvision-detection", "torchvision-segmentation"):
        return tvm.get_model(name, weights=None, weights_backbone=None, num_classes=10).backbone
    if source == "torchvision-quantization":
        return tvm.quantization.__dict__[name](weights=None, quantize=False, num_classes=10)
    return tvm.get_model(name, weights=None, num_classes=10)  # classification and video


def example(arch: str) -> torch.Tensor:
    """The input batch of ``arch``: 2 images at 64x64, or 2 clips of 4 frames at 32x32."""
    shape = (2, 3, 4, 32, 32) if arch.startswith("torchvision-video") else (2, 3, 64, 64)
    return torch.randn(shape)


def flat(output: object) -> torch.Tensor:
    """Every tensor of a model's output (a tensor, a list of feature maps, a dict), as one."""
    if isinstance(output, torch.Tensor):
        return output.flatten()
    values = output.values() if isinstance(output, dict) else output
    return torch.cat([flat(value) for value in values])


def parameter_count(arch: str) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build(arch).parameters())


def relative(actual: object, expected: object) -> float:
    actual, expected = flat(actual).double(), flat(expected).double()
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def monitor_finite(stage) -> bool:
    """The monitor's metric table of ``stage`` is finite (curvature is NaN below 3 blocks)."""
    table = metric_table(*stage_tensors(stage))[0]
    if stage.depth < 3:
        table = table[:, [i for i, name in enumerate(METRICS) if name != "curvature"]]
    return bool(table.isfinite().all())


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout


def measure(arch: str, family: str, max_params: float) -> dict:
    row = {"arch": arch, "family": family, **{c: "" for c in COLUMNS[2:]}, "status": ""}
    try:
        count = parameter_count(arch)
    except Exception:
        count = 0
    if count > max_params:
        row["status"] = f"skipped: {count / 1e6:.0f}M parameters > {max_params / 1e6:.0f}M"
        return row
    torch.manual_seed(0)
    model = randomize_norms(build(arch)).eval()
    x = example(arch)
    try:
        stages = find_stages(model)
    except ValueError as error:
        row["status"] = (
            "no stage: no run of two blocks with an identity skip that the model chains"
            if "No residual stage" in str(error)
            else f"error: {error}"
        )
        return row
    row["stages"] = " ".join(f"{s.name}:{s.depth}" for s in stages)
    with torch.no_grad():
        reference = model(x)
        row["self"] = relative(reference, model.double()(x.double()))
        model.float()
        row["conversion"] = relative(to_ode_form(model)(x), reference)
        row["export"] = relative(export_neural_ode(model)(x), reference)
        finite = [monitor_finite(stage) for stage in stages]
        row["monitor"] = "ok" if all(finite) else "not finite"
        try:
            deeper = resample_depth(model, {stages[0].name: 2 * stages[0].depth})
            row["resample"] = "ok" if bool(flat(deeper(x)).isfinite().all()) else "not finite"
        except ValueError as error:
            row["resample"] = f"refused: {str(error)[:80]}"
    exact = max(row["conversion"], row["export"]) <= TOLERANCE
    if exact:
        row["status"] = "ok"
        return row
    with torch.no_grad():  # where float32 rounding hides what the package computes
        model, x = model.double(), x.double()
        reference = model(x)
        row["f64 conversion"] = relative(to_ode_form(model)(x), reference)
        row["f64 export"] = relative(export_neural_ode(model)(x), reference)
    worst = max(row["f64 conversion"], row["f64 export"])
    if row["self"] > TOLERANCE:
        row["status"] = f"float32 floor: the arch itself differs by {row['self']:.1e} from float64"
    elif worst <= F64_TOLERANCE:
        row["status"] = (
            f"float32 rounding: the arch itself differs by {row['self']:.1e} from float64; "
            f"conversion and export are within {worst:.0e} in float64"
        )
    else:
        row["status"] = "inexact"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-params", type=float, default=150e6)
    parser.add_argument("--timeout", type=int, default=300, help="seconds per arch")
    parser.add_argument("--only", default=None, help="comma-separated families")
    parser.add_argument("--out", default="zoo")
    parser.add_argument(
        "--redo", default="", help="comma-separated archs to measure again; the rest are kept"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    only = set(args.only.split(",")) if args.only else None
    partial = RESULTS / f"{args.out}.jsonl"
    done = {}
    if args.redo:
        redo = set(args.redo.split(","))
        kept = json.loads((RESULTS / f"{args.out}.json").read_text())["rows"]
        done = {row["arch"]: row for row in kept if row["arch"] not in redo}
    if partial.exists():
        for line in partial.read_text().splitlines():
            row = json.loads(line)
            done[row["arch"]] = row
    signal.signal(signal.SIGALRM, _alarm)
    rows = []
    for arch, family in archs(only):
        if arch in done:
            rows.append(done[arch])
            continue
        start = time.perf_counter()
        signal.alarm(args.timeout)
        try:
            row = measure(arch, family, args.max_params)
        except _Timeout:
            row = {"arch": arch, "family": family, "status": f"skipped: over {args.timeout} s"}
        except Exception as error:
            detail = traceback.format_exception_only(error)[-1].strip()[:160]
            row = {"arch": arch, "family": family, "status": f"error: {detail}"}
        finally:
            signal.alarm(0)
        row["seconds"] = round(time.perf_counter() - start, 1)
        print(json.dumps(row), flush=True)
        with partial.open("a") as file:
            file.write(json.dumps(row) + "\n")
        rows.append(row)
    write(rows, args.out)
    partial.unlink()


def _cell(value: object) -> str:
    if isinstance(value, float):
        return "0" if value == 0 else f"{value:.1e}" if math.isfinite(value) else str(value)
    return str(value).replace("|", "/")


def totals(rows: list[dict]) -> list[dict]:
    """Per family: archs, with stages, passing (conversion and export <= 1e-5), monitor ok."""
    families: dict[str, list[dict]] = {}
    for row in rows:
        families.setdefault(row["family"], []).append(row)
    families["all"] = rows
    return [
        {
            "family": family,
            "archs": len(members),
            "skipped": sum(r["status"].startswith("skipped") for r in members),
            "with stages": sum(bool(r.get("stages")) for r in members),
            "convert and export <= 1e-5": sum(r["status"] == "ok" for r in members),
            "monitor ok": sum(r.get("monitor") == "ok" for r in members),
            "resample ok": sum(r.get("resample") == "ok" for r in members),
        }
        for family, members in families.items()
    ]


def write(rows: list[dict], name: str) -> None:
    env = environment("cpu") | {"timm": timm.__version__}
    atomic_write_text(
        json.dumps({"environment": env, "rows": rows}, indent=2) + "\n", RESULTS / f"{name}.json"
    )
    summary = totals(rows)
    table = [{c: _cell(row.get(c, "")) for c in [*COLUMNS, "status"]} for row in rows]
    text = (
        "# ResNet zoo coverage\n\n"
        "Out of the box, no registration. Random weights with randomised BatchNorm statistics "
        "and affine parameters, eval, float32, batch 2 at 64x64 (video: 2 clips of 4 frames at "
        "32x32); errors are max |Δy| / max |y| over every output (a backbone's feature maps "
        "too). "
        "`self` is the arch's own float32 error against float64.\n\n"
        + markdown_table(summary, list(summary[0]))
        + "\n"
        + markdown_table(table, [*COLUMNS, "status"])
        + "\n"
        + ", ".join(f"{k} {v}" for k, v in env.items())
        + "\n"
    )
    atomic_write_text(text, RESULTS / f"{name}.md")


if __name__ == "__main__":
    main()
