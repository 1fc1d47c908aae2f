"""A training run's smoothness measurements, per stage: metric tables, depth profiles, probes.

Measurements are appended as device tensors and moved to host memory in batches, with one
host transfer for everything pending; the host copy is a plain dict of tensors (the format of
:attr:`SmoothnessMonitor.history <resode_lightning.SmoothnessMonitor.history>` and of its
checkpoint state), read back with validation. Metrics are stored by name, so a history written
before a metric existed reads back with that metric NaN in its earlier rows; a stage whose
depth changes keeps its earlier rows, each with its own depth.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from itertools import groupby
from typing import Any, NamedTuple

import torch
from torch import Tensor

from resode_lightning.core.metrics import ALL, METRICS

FIELDS: tuple[str, ...] = (
    "step",
    "depth",
    "parameters",
    "metrics",
    "depth_profile",
    "probe_step",
    "depth_consistency",
)
"""The entries of one stage's record in :meth:`SmoothnessHistory.state_dict`."""
# state version 1: records without "depth", "metrics" one tensor over these metrics in order
_V1_FIELDS = tuple(field for field in FIELDS if field != "depth")
_V1_METRICS = ("weight_norm", "lipschitz", "total_variation", "relative_roughness", "curvature")
_WEIGHT_NORM = METRICS.index("weight_norm")


class Measurement(NamedTuple):
    """One stage measured once (:func:`~resode_lightning.core.metrics.metric_table`).

    Attributes:
        stage: the stage's name.
        parameters: ``(ALL, *names)``, the rows of ``table``.
        table: metrics of shape ``(len(parameters), len(METRICS))``.
        profile: ``||θ_{k+1} - θ_k||`` of all parameters as one vector, shape ``(L-1,)``.
    """

    stage: str
    parameters: tuple[str, ...]
    table: Tensor
    profile: Tensor

    def scalars(self, prefix: str, *, per_parameter: bool = True) -> dict[str, float]:
        """The table as ``{key: value}`` (on the CPU), keyed as the monitor logs it.

        Keys: ``PREFIX/STAGE/METRIC`` for :data:`ALL` parameters, then (with ``per_parameter``)
        ``PREFIX/STAGE/PARAM/METRIC`` for each parameter name.
        """
        rows = self.table.tolist() if per_parameter else self.table[:1].tolist()
        stage = f"{prefix}/{self.stage}"
        return {
            f"{stage}/{metric}" if name == ALL else f"{stage}/{name}/{metric}": value
            for name, row in zip(self.parameters, rows, strict=False)
            for metric, value in zip(METRICS, row, strict=True)
        }


class Drained(NamedTuple):
    """What :meth:`SmoothnessHistory.drain` hands over.

    Attributes:
        measurements: ``[(step, [Measurement, ...]), ...]`` in append order, on the CPU.
        restarted: ``[(stage, step), ...]``: the parameter names of ``stage`` changed, so its
            metric history starts again at ``step``.
        non_finite: ``[(stage, parameter, step), ...]``: the weights of a block parameter name
            were non-finite at ``step``, for the first time in this history.
    """

    measurements: list[tuple[int, list[Measurement]]]
    restarted: list[tuple[str, int]]
    non_finite: list[tuple[str, str, int]]


class SmoothnessHistory:
    """Smoothness measurements over training steps, per stage, with depth-consistency probes.

    Appending keeps the device tensors as they are (no host synchronisation); reading the
    history, saving it or :meth:`drain` moves everything pending to host memory at once. An
    append at step ``s`` replaces what the history holds at ``s`` and after, so a run resumed
    from a checkpoint's history continues it. A stage measured at another depth than before
    (its blocks resampled or grown) keeps its earlier rows; new parameter names start its
    metric history again.

    Example::

        >>> history = SmoothnessHistory()
        >>> history.append(10, [Measurement("layer1", (ALL,), torch.ones(1, 5), torch.ones(2))])
        >>> history.steps("layer1").tolist(), history.depth("layer1").tolist()
        ([10], [3])
    """

    def __init__(self) -> None:
        self._records: dict[str, dict[str, Any]] = {}
        self._pending: list[tuple[int, list[Measurement]]] = []
        self._non_finite: set[tuple[str, str]] = set()
        self._drained = Drained([], [], [])

    @property
    def pending(self) -> int:
        """Number of appended steps not yet moved to host memory."""
        return len(self._pending)

    @property
    def stages(self) -> list[str]:
        """Names of the stages measured at least once, in order of first appearance."""
        self._to_host()
        return [name for name, record in self._records.items() if len(record["step"])]

    def append(self, step: int, measurements: Iterable[Measurement]) -> None:
        """Record the measurements of one training step (kept on their device)."""
        self._pending.append((step, list(measurements)))

    def add_probe(self, step: int, values: Mapping[str, Tensor]) -> None:
        """Record depth-consistency errors ``{stage: 0-d tensor}`` measured at ``step``."""
        self._to_host()
        for name, value in values.items():
            record = self._records.setdefault(name, _empty_record())
            keep = record["probe_step"] < step
            record["probe_step"] = torch.cat([record["probe_step"][keep], torch.tensor([step])])
            record["depth_consistency"] = torch.cat(
                [record["depth_consistency"][keep], value.detach().float().cpu().reshape(1)]
            )

    def drain(self) -> Drained:
        """What was appended since the last drain, on the CPU, and the events it brought.

        Measurements moved to host memory are kept for the next drain (the monitor drains
        them at every flush to log them).
        """
        self._to_host()
        drained, self._drained = self._drained, Drained([], [], [])
        return drained

    def steps(self, stage: str) -> Tensor:
        """Training steps of the stage's measurements, int64 ``(n,)``."""
        return self._record(stage)["step"]

    def depth(self, stage: str) -> Tensor:
        """The stage's number of blocks at each measurement, int64 ``(n,)``."""
        return self._record(stage)["depth"]

    def parameters(self, stage: str) -> list[str]:
        """Rows of the stage's metric tables: :data:`ALL`, then the block parameter names."""
        return list(self._record(stage)["parameters"])

    def metric(self, stage: str, metric: str, parameter: str = ALL) -> Tensor:
        """One metric of one parameter name (default: all as one vector) over steps, ``(n,)``.

        A metric that did not exist yet when a row was measured is NaN in that row.
        """
        record = self._record(stage)
        if metric not in record["metrics"]:
            raise ValueError(f"unknown metric {metric!r}; known: {', '.join(record['metrics'])}")
        if parameter not in record["parameters"]:
            raise ValueError(f"stage {stage!r} has no parameter {parameter!r}")
        return record["metrics"][metric][:, record["parameters"].index(parameter)]

    def depth_profile(self, stage: str) -> Tensor:
        """``||θ_{k+1} - θ_k||`` over steps, float32 ``(n, W)``: row ``i`` holds
        ``depth(stage)[i] - 1`` values, then NaN up to the widest row."""
        return self._record(stage)["depth_profile"]

    def state_dict(self) -> dict[str, dict[str, Any]]:
        """The history as plain data, on the CPU.

        Returns:
            ``{stage: {"step": int64 (n,), "depth": int64 (n,), "parameters": [ALL, names…],
            "metrics": {metric: float32 (n, len(parameters))}, "depth_profile": float32
            (n, W), "probe_step": int64 (m,), "depth_consistency": float32 (m,)}}``; row ``i``
            of a depth profile holds ``depth[i] - 1`` values, then NaN up to the widest row.
        """
        self._to_host()
        return {
            name: {**record, "metrics": dict(record["metrics"])}
            for name, record in self._records.items()
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Mapping[str, Any]]) -> SmoothnessHistory:
        """A history holding ``state`` (the format of :meth:`state_dict`), checked.

        Records of the monitor's state version 1 (no ``"depth"``, ``"metrics"`` one tensor of
        shape ``(n, len(parameters), 5)``) are converted; their depths are read from the NaN
        padding of their depth profiles. Metrics of :data:`METRICS` that a record lacks
        are NaN in its rows; metrics it holds that this version does not know are kept.

        Raises:
            ValueError: ``state`` is not in that format; the message names the stage and entry.
        """
        if not isinstance(state, Mapping):
            raise ValueError(
                f"a smoothness history is a dict of stages, got {type(state).__name__}"
            )
        history = cls()
        for name, record in state.items():
            if not isinstance(name, str):
                raise ValueError(f"a smoothness history's stage names are str, got {name!r}")
            try:
                history._records[name] = _checked(record)
            except ValueError as error:
                raise ValueError(f"smoothness history, stage {name!r}: {error}") from None
        return history

    def _record(self, stage: str) -> dict[str, Any]:
        self._to_host()
        if stage not in self._records:
            raise KeyError(f"no stage {stage!r} in the history; stages: {list(self._records)}")
        return self._records[stage]

    def _to_host(self) -> None:
        """Move every pending measurement to host memory in one transfer and merge it."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        parts = [
            t.reshape(-1).float() for _, ms in pending for m in ms for t in (m.table, m.profile)
        ]
        flat = torch.cat(parts).cpu() if parts else torch.zeros(0)
        values = iter(flat.split([part.numel() for part in parts]))
        moved = [
            (
                step,
                [
                    m._replace(table=next(values).view(m.table.shape), profile=next(values))
                    for m in measurements
                ],
            )
            for step, measurements in pending
        ]
        by_stage: dict[str, list[tuple[int, Measurement]]] = {}
        for step, measurements in moved:
            for m in measurements:
                by_stage.setdefault(m.stage, []).append((step, m))
                bad = ~torch.isfinite(m.table[1:, _WEIGHT_NORM])
                for name in (m.parameters[row + 1] for row in bad.nonzero().flatten().tolist()):
                    if (m.stage, name) not in self._non_finite:
                        self._non_finite.add((m.stage, name))
                        self._drained.non_finite.append((m.stage, name, step))
        for name, entries in by_stage.items():
            for _, run in groupby(entries, key=lambda entry: entry[1].parameters):
                self._merge(name, list(run))
        self._drained.measurements.extend(moved)

    def _merge(self, name: str, entries: list[tuple[int, Measurement]]) -> None:
        steps = torch.tensor([step for step, _ in entries], dtype=torch.int64)
        parameters = list(entries[0][1].parameters)
        record = self._records.get(name)
        if record is None or record["parameters"] != parameters:
            if record is not None and len(record["step"]):
                self._drained.restarted.append((name, int(steps[0])))
            fresh = _empty_record()
            if record is not None:
                fresh["probe_step"] = record["probe_step"]
                fresh["depth_consistency"] = record["depth_consistency"]
            fresh["parameters"] = parameters
            record = self._records[name] = fresh
        keep = record["step"] < steps[0]
        tables = torch.stack([m.table for _, m in entries])
        kept = {
            metric: values[keep].reshape(-1, len(parameters))
            for metric, values in record["metrics"].items()
        }
        record["metrics"] = _with_metrics(kept, int(keep.sum()), len(parameters))
        for column, metric in enumerate(METRICS):
            record["metrics"][metric] = torch.cat([record["metrics"][metric], tables[..., column]])
        for metric in set(record["metrics"]) - set(METRICS):  # kept from a newer version
            missing = torch.full((len(entries), len(parameters)), math.nan)
            record["metrics"][metric] = torch.cat([record["metrics"][metric], missing])
        depths = torch.tensor([len(m.profile) + 1 for _, m in entries], dtype=torch.int64)
        width = max(record["depth_profile"].shape[1], int(depths.max()) - 1)
        profiles = torch.stack([_pad(m.profile, width) for _, m in entries])
        record["step"] = torch.cat([record["step"][keep], steps])
        record["depth"] = torch.cat([record["depth"][keep], depths])
        record["depth_profile"] = torch.cat([_pad(record["depth_profile"][keep], width), profiles])


def _pad(values: Tensor, width: int) -> Tensor:
    missing = width - values.shape[-1]
    if missing <= 0:
        return values
    return torch.nn.functional.pad(values, (0, missing), value=math.nan)


def _with_metrics(metrics: dict[str, Tensor], rows: int, columns: int) -> dict[str, Tensor]:
    """``metrics`` with every metric of :data:`METRICS` (NaN where missing) first, in order."""
    ordered = {
        metric: metrics[metric] if metric in metrics else torch.full((rows, columns), math.nan)
        for metric in METRICS
    }
    return {**ordered, **{k: v for k, v in metrics.items() if k not in ordered}}


def _empty_record() -> dict[str, Any]:
    return {
        "step": torch.zeros(0, dtype=torch.int64),
        "depth": torch.zeros(0, dtype=torch.int64),
        "parameters": [],
        "metrics": _with_metrics({}, 0, 0),
        "depth_profile": torch.zeros(0, 0),
        "probe_step": torch.zeros(0, dtype=torch.int64),
        "depth_consistency": torch.zeros(0),
    }


def _checked(record: object) -> dict[str, Any]:
    """A stage's record, converted to int64/float32 CPU tensors; ``ValueError`` if malformed."""
    if not isinstance(record, Mapping):
        raise ValueError(f"the record is a dict, got {type(record).__name__}")
    version_1 = "depth" not in record and isinstance(record.get("metrics"), Tensor)
    fields = set(_V1_FIELDS if version_1 else FIELDS)
    if set(record) != fields:
        missing, extra = fields - set(record), set(record) - fields
        raise ValueError(
            f"entries missing: {sorted(missing)}, unexpected: {sorted(extra, key=str)}"
        )
    if version_1:
        record = _from_version_1(record)
    step = _tensor(record, "step", integer=True, dims=1)
    if (step[1:] <= step[:-1]).any():
        raise ValueError("'step' is not strictly increasing")
    parameters = _parameters(record, len(step))
    depth = _tensor(record, "depth", integer=True, dims=1)
    if len(depth) != len(step) or (depth < 2).any():
        raise ValueError(f"'depth' holds {len(step)} block counts >= 2, got {depth.tolist()}")
    metrics = record["metrics"]
    if not isinstance(metrics, Mapping) or not all(isinstance(k, str) for k in metrics):
        raise ValueError(f"'metrics' is a dict of metric names, got {type(metrics).__name__}")
    checked = {}
    for metric in metrics:
        values = _tensor(metrics, metric, integer=False, dims=2)
        if tuple(values.shape) != (len(step), len(parameters)):
            raise ValueError(
                f"'metrics' {metric!r} has shape {(len(step), len(parameters))} (steps, "
                f"parameters), got {tuple(values.shape)}"
            )
        checked[metric] = values
    profile = _tensor(record, "depth_profile", integer=False, dims=2)
    if len(profile) != len(step):
        raise ValueError(f"'depth_profile' has {len(step)} rows, got {len(profile)}")
    if len(depth) and int(depth.max()) - 1 > profile.shape[1]:
        raise ValueError(
            f"'depth_profile' has {int(depth.max()) - 1} columns (the most blocks - 1), got "
            f"{profile.shape[1]}"
        )
    probe_step = _tensor(record, "probe_step", integer=True, dims=1)
    consistency = _tensor(record, "depth_consistency", integer=False, dims=1)
    if len(consistency) != len(probe_step):
        raise ValueError(
            f"'depth_consistency' has one value per 'probe_step' ({len(probe_step)}), "
            f"got {len(consistency)}"
        )
    return {
        "step": step,
        "depth": depth,
        "parameters": parameters,
        "metrics": _with_metrics(checked, len(step), len(parameters)),
        "depth_profile": profile,
        "probe_step": probe_step,
        "depth_consistency": consistency,
    }


def _from_version_1(record: Mapping[str, Any]) -> dict[str, Any]:
    """A record of state version 1 in the current format (still to be checked)."""
    step = _tensor(record, "step", integer=True, dims=1)
    parameters = _parameters(record, len(step))
    table = _tensor(record, "metrics", integer=False, dims=3)
    expected = (len(step), len(parameters), len(_V1_METRICS))
    if tuple(table.shape) != expected:
        raise ValueError(f"'metrics' has shape {expected}, got {tuple(table.shape)}")
    profile = _tensor(record, "depth_profile", integer=False, dims=2)
    # a row padded with NaN (the stage was resampled) ends at its last finite value
    finite = torch.isfinite(profile)
    width = profile.shape[1]
    last = (finite * torch.arange(1, width + 1)).amax(1) if width else torch.zeros(len(profile))
    return {
        **record,
        "depth": (torch.where(finite.any(1), last, width) + 1).long(),
        "metrics": {name: table[..., i] for i, name in enumerate(_V1_METRICS)},
    }


def _parameters(record: Mapping[str, Any], steps: int) -> list[str]:
    """The record's parameter names, checked: :data:`ALL` first once anything was measured."""
    parameters = record["parameters"]
    if not isinstance(parameters, (list, tuple)) or not all(isinstance(p, str) for p in parameters):
        raise ValueError(f"'parameters' is a list of str, got {parameters!r}")
    if steps and (not parameters or parameters[0] != ALL):
        raise ValueError(f"'parameters' starts with {ALL!r}, got {list(parameters)!r}")
    return list(parameters)


def _tensor(record: Mapping[str, Any], key: str, *, integer: bool, dims: int) -> Tensor:
    value = record[key]
    if not isinstance(value, Tensor):
        got = type(value).__name__
    elif value.dim() != dims or value.dtype == torch.bool or value.is_complex():
        got = f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    elif value.is_floating_point() == integer:
        got = f"a {value.dtype} tensor"
    else:
        return value.detach().cpu().to(torch.int64 if integer else torch.float32)
    kind = "an integer" if integer else "a floating-point"
    raise ValueError(f"{key!r} is {kind} {dims}-d tensor, got {got}")
