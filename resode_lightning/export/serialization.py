"""Save and load exported neural ODEs: weights plus a JSON configuration, no pickled objects.

The file is a ``torch.save`` of ``{"config": <JSON text>, "state_dict": {...}}``: it loads with
``torch.load(..., weights_only=True)``. The configuration holds the source spec (see
:mod:`resode_lightning.export.source`) and the export options. Loading exports a model of the
source architecture with the same options, built by the package or given by the caller as a
skeleton, and loads the weights into it strictly. Nothing named in the file is imported.
"""

from __future__ import annotations

import copy
import io
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from resode_lightning.core.blocks import qualified_name
from resode_lightning.core.io.atomic import atomic_write
from resode_lightning.core.io.checkpoint import safe_torch_load
from resode_lightning.core.io.errors import CheckpointError
from resode_lightning.core.odeform import convert_stage, unconvert_stage
from resode_lightning.core.stages import MARKER, Stage, find_stages
from resode_lightning.export.build import build_export, exported_config
from resode_lightning.export.options import ExportOptions
from resode_lightning.export.solve import NeuralODEStage
from resode_lightning.export.source import (
    BUILT_KINDS,
    _build,
    build_source,
    check_source_spec,
    fingerprint,
    fingerprint_differences,
)

FORMAT = "resode-neural-ode/3"
LEGACY_FORMAT = "resode-neural-ode/2"
"""Files of format 2 hold BatchNorm folded into the knots (format 3 folds after interpolating);
they load as they were written."""


def save_neural_ode(
    module: nn.Module, path: str | os.PathLike, *, model: nn.Module | None = None
) -> Path:
    """Write an exported model to ``path`` atomically, once it is known to load back.

    The file's content is read back in memory by the loader's own code (the export it
    declares is built again and the weights loaded into it, strictly) before anything is
    written, so a file that :func:`load_neural_ode` would refuse is never written. Exports of any
    architecture can be saved; those of architectures other than torchvision ResNets and
    ``ode_resnet`` load with a skeleton (see :func:`load_neural_ode`), which ``model`` gives
    for the check (without one, their layout is not checked here).

    Args:
        module: a model returned by :func:`export_neural_ode` (possibly fine-tuned since).
        path: the output file; its directory must exist.
        model: a skeleton of the source (its weights do not matter; it is not modified).

    Returns:
        The path written.

    Raises:
        ValueError: ``module`` was not made by ``export_neural_ode``; a weight holds NaN or
            infinite values; the content would not load back. Nothing is written then, and an
            existing file is kept.
    """
    config = exported_config(module)
    config["export"]["compile"] = False  # how to run is the loader's choice, not the file's
    text = json.dumps({"format": FORMAT, **config}, sort_keys=True)
    state = {key: value.detach().cpu() for key, value in module.state_dict().items()}
    broken = non_finite(state)
    if broken:
        raise ValueError(
            f"not saving {os.fspath(path)!r}: {_head(broken)} hold NaN or infinite values (the "
            f"weights diverged?); an existing file was kept"
        )
    content = {"config": text, "state_dict": state}
    buffer = io.BytesIO()
    torch.save(content, buffer)
    if model is not None or config["source"]["kind"] in BUILT_KINDS:
        try:
            _from_content(Path(path), safe_torch_load(path, data=buffer.getvalue()), model)
        except CheckpointError as error:
            raise ValueError(
                f"not saving {os.fspath(path)!r}: it would not load back ({error}); an existing "
                f"file was kept"
            ) from None
    return atomic_write(path, lambda file: file.write(buffer.getvalue()))


def non_finite(state: dict[str, torch.Tensor]) -> list[str]:
    """The names of the floating tensors of ``state`` that hold NaN or infinite values."""
    return [
        name
        for name, tensor in state.items()
        if tensor.is_floating_point() and not bool(tensor.isfinite().all())
    ]


def _head(names: list[str], count: int = 3) -> str:
    more = f" and {len(names) - count} more" if len(names) > count else ""
    return ", ".join(names[:count]) + more


def load_neural_ode(
    path: str | os.PathLike,
    *,
    model: nn.Module | None = None,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """Read a model written by :func:`save_neural_ode` (without unpickling anything), in eval mode.

    Args:
        path: the file.
        model: a skeleton of the source architecture: a fresh instance of the exported model's
            class, built with the same arguments (its weights do not matter; it is not
            modified). Needed when the source is neither a torchvision ResNet nor an
            ``ode_resnet``; accepted for those too. Its block types must be registered.
        map_location: device of the returned model.

    Returns:
        The exported model, with the saved weights and dtypes.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file is not a saved neural ODE; it needs a skeleton and none was
            given; the skeleton is of another class or structure than the source, or cannot be
            exported; the weights do not match.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"neural ODE file {str(path)!r} does not exist or is not a file")
    return _from_content(path, safe_torch_load(path), model).to(map_location).eval()


def _from_content(path: Path, content: object, model: nn.Module | None) -> nn.Module:
    """The export a file's content declares, its weights loaded (see :func:`load_neural_ode`)."""
    if not (
        isinstance(content, dict)
        and isinstance(content.get("config"), str)
        and isinstance(content.get("state_dict"), dict)
    ):
        raise CheckpointError(
            f"{path} is not a neural ODE file written by save_neural_ode (no config and weights)"
        )
    state = content["state_dict"]
    source, options, legacy = _read_config(path, content["config"], state)
    if model is None and source["kind"] not in BUILT_KINDS:
        raise CheckpointError(
            f"{path}: this export was made from {source['class']}; pass "
            f"model=<a fresh {source['class']}(...)> to load_neural_ode (with its block types "
            f"registered)"
        )
    if model is not None:
        _check_skeleton(path, source, model)
    _check_layout(path, source, model, options, legacy, state)
    base = build_source(source) if model is None else copy.deepcopy(model)
    try:
        _set_form(base, source["horizons"])
        exported = build_export(base, options, fold_at_knots=legacy and options.fold_bn)
    except ValueError as error:
        raise CheckpointError(f"{path}: cannot export {source['class']} again: {error}") from None
    try:
        exported.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        what = "its own configuration" if model is None else "the export of the given model"
        raise CheckpointError(f"{path} does not match {what}: {error}") from None
    _check_loaded(path, exported)
    return exported


def _read_config(
    path: Path, text: str, state: dict[object, object]
) -> tuple[dict[str, Any], ExportOptions, bool]:
    """The file's source spec, options and whether it is of :data:`LEGACY_FORMAT`, checked field
    by field before anything is built."""
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} has an unreadable config: {error}") from None
    if not isinstance(config, dict) or config.get("format") not in (FORMAT, LEGACY_FORMAT):
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise CheckpointError(f"{path} has format {found!r}, expected {FORMAT!r}")
    if set(config) != {"format", "source", "export"}:
        raise CheckpointError(
            f"{path} config has the fields {sorted(config)}, expected format, source and export"
        )
    bad_key = next((key for key in state if not isinstance(key, str)), None)
    if bad_key is not None or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds weights that are not tensors named by strings")
    try:
        check_source_spec(config["source"])
        options = ExportOptions.from_config(config["export"])
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{path} has an invalid config: {error}") from None
    if options.compile:
        raise CheckpointError(
            f"{path} asks for compile=True, which a file cannot switch on: load it, then "
            f"compile what you choose"
        )
    return config["source"], options, config["format"] == LEGACY_FORMAT


def _check_layout(
    path: Path,
    source: dict[str, Any],
    model: nn.Module | None,
    options: ExportOptions,
    legacy: bool,
    state: dict[str, torch.Tensor],
) -> None:
    """Raise ``CheckpointError`` unless ``state`` has exactly the tensors, shapes and kinds of
    the export the file declares, every key both ways; the export is laid out on the meta
    device, so a file declaring a larger net than it holds allocates nothing."""
    meta = _build(source, "meta") if model is None else _on_meta(copy.deepcopy(model))
    try:
        _set_form(meta, source["horizons"])
        declared = build_export(meta, options, fold_at_knots=legacy and options.fold_bn)
    except ValueError as error:
        raise CheckpointError(f"{path}: cannot export {source['class']} again: {error}") from None
    expected = declared.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{key} {list(value.shape)} declared, {list(state[key].shape)} stored"
        for key, value in expected.items()
        if key in state
        and (
            list(value.shape) != list(state[key].shape)
            or value.is_floating_point() != state[key].is_floating_point()
        )
    ]
    problems = [
        *([f"missing {_head(missing)}"] if missing else []),
        *([f"unexpected {_head(unexpected)}"] if unexpected else []),
        *wrong[:3],
    ]
    if problems:
        raise CheckpointError(
            f"{path} declares an architecture its weights do not have: " + "; ".join(problems)
        )


def _check_loaded(path: Path, exported: nn.Module) -> None:
    """Refuse non-finite weights, and horizons or knot times a saved export cannot have."""
    for name, tensor in exported.state_dict().items():
        if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
            raise CheckpointError(f"{path}: {name} holds NaN or infinite values")
    for name, stage in exported.named_modules():
        if not isinstance(stage, NeuralODEStage):
            continue
        horizon, times = float(stage.horizon), stage.field.path.times
        if not horizon > 0:
            raise CheckpointError(f"{path}: {name}.horizon is {horizon}, not a positive number")
        ordered = bool((times[1:] > times[:-1]).all()) if times.numel() > 1 else True
        if not (ordered and float(times[0]) >= 0 and float(times[-1]) <= horizon):
            raise CheckpointError(
                f"{path}: {name}.field.path.times are not increasing times in [0, {horizon:g}]"
            )


def _on_meta(model: nn.Module) -> nn.Module:
    """``model`` with its tensors on the meta device, in place; ODE-form markers stay on the
    host (their horizon is read to lay out the export)."""
    for module in model.modules():
        for name, parameter in module._parameters.items():
            if parameter is not None:
                module._parameters[name] = nn.Parameter(
                    parameter.detach().to("meta"), requires_grad=parameter.requires_grad
                )
        for name, buffer in module._buffers.items():
            if buffer is not None and not name.startswith(MARKER):
                module._buffers[name] = buffer.to("meta")
    return model


def _check_skeleton(path: Path, source: dict[str, Any], model: nn.Module) -> None:
    """Raise ``CheckpointError`` unless ``model`` has the source's class and structure."""
    name = qualified_name(type(model))
    if name != source["class"]:
        raise CheckpointError(
            f"{path} was exported from {source['class']}, but model= is a {name}; pass "
            f"model=<a fresh {source['class']}(...)>"
        )
    differences = fingerprint_differences(source["fingerprint"], fingerprint(model))
    if differences:
        raise CheckpointError(
            f"{path} was exported from another {name} than model= (other constructor "
            f"arguments?): " + "; ".join(differences)
        )


def _set_form(model: nn.Module, horizons: dict[str, float]) -> None:
    """Put the stages of ``model`` in the ODE form ``horizons`` records (plain where none).

    The exported field of a stage depends on its horizon.
    """
    prefix_of = {id(module): f"{name}." if name else "" for name, module in model.named_modules()}
    for stage in find_stages(model):
        key = prefix_of[id(stage.container)] + stage.marker
        _marker_on_host(stage, horizons.get(key, 1.0))
        horizon = horizons.get(key)
        if stage.horizon != horizon:
            unconvert_stage(stage)
            if horizon is not None:
                convert_stage(stage, horizon)
                _marker_on_host(stage, horizon)


def _marker_on_host(stage: Stage, horizon: float) -> None:
    """A marker on the meta device (a layout, whose weights are not real) gets a host value."""
    marker = stage.container._buffers.get(stage.marker)
    if marker is not None and marker.is_meta:
        stage.container._buffers[stage.marker] = torch.tensor(float(horizon), dtype=torch.float64)
