"""Shared plumbing of the benchmark scripts: environment record and result files."""

from __future__ import annotations

import datetime
import json
import platform
from pathlib import Path

import pytorch_lightning as pl
import torch
import torchvision

from resode_lightning.core.io.atomic import atomic_write_text

RESULTS = Path(__file__).parent / "results"


def environment(device: str) -> dict[str, str]:
    """Device, versions and date, recorded with every result."""
    name = (
        torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu"
    )
    return {
        "device": f"{device} ({name})",
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "threads": str(torch.get_num_threads()),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_results(
    name: str, env: dict[str, str], rows: list[dict], columns: list[str], notes: str = ""
) -> Path:
    """Write ``results/<name>.json`` and ``results/<name>.md``; returns the markdown path."""
    RESULTS.mkdir(exist_ok=True)
    atomic_write_text(
        json.dumps({"environment": env, "rows": rows}, indent=2) + "\n", RESULTS / f"{name}.json"
    )
    header = ", ".join(f"{k} {v}" for k, v in env.items())
    text = f"{markdown_table(rows, columns)}\n{header}\n" + (f"\n{notes}\n" if notes else "")
    return atomic_write_text(text, RESULTS / f"{name}.md")


def cpu_trainer(**kwargs) -> pl.Trainer:
    """A Trainer on the CPU that trains only: no logger, checkpoint, progress bar, summary or
    validation, so that timings hold training alone."""
    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        **kwargs,
    )
