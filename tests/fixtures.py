"""Small generated datasets in the real on-disk formats (torchvision raw MNIST, medmnist npz).

Images carry a class-dependent pattern so that tiny models can learn something, but no accuracy
number anywhere comes from these files: they only exercise code paths.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

SPLIT_SIZES = {"train": 96, "val": 32, "test": 48}


def _images(rng: np.random.Generator, labels: np.ndarray, shape: tuple[int, ...], n_classes: int) -> np.ndarray:
    """Noise plus a bright block whose position encodes the (first) label."""
    images = rng.integers(0, 60, size=(len(labels), *shape), dtype=np.uint8)
    side = shape[0]
    for i, label in enumerate(labels):
        offset = int(label) * max(1, (side - 6) // max(1, n_classes - 1))
        offset = min(offset, side - 6)
        index = (i, slice(offset, offset + 6), slice(offset, offset + 6))
        images[index] = 220
    return images


def write_mnist(root: Path, train: int = 600, test: int = 200, seed: int = 0) -> Path:
    """``root/MNIST/raw/*-ubyte.gz`` in the IDX format torchvision reads."""
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", train), ("t10k", test)):
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        images = _images(rng, labels, (28, 28), 10)
        with gzip.open(raw / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        with gzip.open(raw / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">II", 2049, n) + labels.tobytes())
    return root


def write_medmnist(root: Path, flag: str, size: int = 28, seed: int = 0) -> Path:
    """``root/medmnist/<flag>[_size].npz`` with the official keys, dtypes and shapes."""
    import medmnist

    info = medmnist.INFO[flag]
    cls = getattr(medmnist, info["python_class"])
    is_3d = issubclass(cls, medmnist.dataset.MedMNIST3D)
    n_labels = len(info["label"])
    shape = (size,) * 3 if is_3d else ((size, size, 3) if info["n_channels"] == 3 else (size, size))
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in SPLIT_SIZES.items():
        if info["task"] == "multi-label, binary-class":
            labels = rng.integers(0, 2, size=(n, n_labels)).astype(np.uint8)
            labels[:n_labels, :] = np.eye(n_labels, dtype=np.uint8)[: min(n, n_labels)]  # every label seen
            images = _images(rng, labels.argmax(1), shape, n_labels)
        else:
            labels = (np.arange(n) % n_labels).astype(np.uint8).reshape(-1, 1)  # every class present
            rng.shuffle(labels)
            images = _images(rng, labels[:, 0], shape, n_labels)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    out = root / "medmnist"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{flag}{'' if size == 28 else f'_{size}'}.npz"
    np.savez_compressed(path, **arrays)
    return path
