"""Small on-disk data sets in the real formats: CIFAR-10 python batches and image folders."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


def write_cifar10(root: Path, per_batch: int = 8, protocol: int = 2, seed: int = 0) -> dict:
    """``root/cifar-10-batches-py`` with 5 train batches and a test batch of ``per_batch`` images.

    The files follow the layout of the real archive: a dict with byte-string keys ``data``
    (uint8, ``(N, 3072)``, channel-major rows), ``labels`` (a list of ints), ``batch_label`` and
    ``filenames``; ``batches.meta`` holds ``label_names``. Returns the arrays written.
    """
    rng = np.random.default_rng(seed)
    directory = root / "cifar-10-batches-py"
    directory.mkdir(parents=True)
    written = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        batch = {
            b"batch_label": name.encode(),
            b"labels": labels,
            b"data": data,
            b"filenames": [f"{name}_{i}.png".encode() for i in range(per_batch)],
        }
        (directory / name).write_bytes(pickle.dumps(batch, protocol=protocol))
        written[name] = (data, labels)
    meta = {b"label_names": [n.encode() for n in CIFAR_CLASSES], b"num_cases_per_batch": per_batch}
    (directory / "batches.meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    return written


def write_image_folder(
    root: Path,
    classes: tuple[str, ...] = ("cat", "dog"),
    per_class: int = 3,
    size: int = 12,
    seed: int = 0,
) -> None:
    """``root/<class>/<i>.png``: small random RGB images."""
    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
