"""The model card: the one contract shared by training (writes it) and serving (reads it).

A card lives beside each exported model as ``model.json``. This module is torch-free on purpose:
the serving container imports it, and ``training.export`` uses it to write cards.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

SCHEMA_VERSION = 1
TASKS = ("multi-class", "binary-class", "multi-label, binary-class", "ordinal-regression")
LAYOUTS = {"NHW": 2, "NHWC": 3, "NDHW": 3}  # layout -> number of per-image dimensions
INPUT_NAME = "images"
PROBS_NAME = "probs"
LOGITS_NAME = "logits"
PLAIN = 16  # an input_background this close to black or white: training images on a plain black / white surround
INK_GAP = 64  # a pixel this far from a plain background, in any channel, is part of a training image's strokes


def plain_background(level: int | None) -> bool:
    """Whether training images of background grey ``level`` sit on black or white (MNIST), not on a picture
    (False where the card does not say)."""
    return level is not None and (level <= PLAIN or level >= 255 - PLAIN)


def stroke_pixels(pixels: np.ndarray, background: int, colour: bool) -> np.ndarray:
    """Which of uint8 ``pixels`` are strokes on a plain ``background``: more than ``INK_GAP`` grey levels from it
    (a plain background is near black or white, so on one side of it), in any channel (``colour``: the last axis
    holds the channels, which it drops). What export measures ``input_strokes_share`` with, and what the service
    crops an upload to."""
    ink = pixels > background + INK_GAP if background < 128 else pixels < background - INK_GAP
    return ink.any(axis=-1) if colour else ink


class CardError(ValueError):
    """A model card is missing, malformed or does not match its model file."""


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor; ``shape`` excludes the batch dimension."""

    name: str
    datatype: str  # Open Inference Protocol names: UINT8, FP32
    shape: list[int]


@dataclass(frozen=True)
class BatchingSpec:
    """Dynamic-batching defaults the service applies to this model."""

    max_batch_size: int = 64
    # 0 = natural batching: a batch runs as soon as the model is free, and what arrives meanwhile forms
    # the next one (no added latency when idle); > 0 waits up to this long to fill a batch
    max_queue_delay_ms: float = 0.0
    # admission control: at most this many images wait in the queue (0 = no hard bound; the service's
    # latency budget still applies, see serving/batcher.py)
    max_queue_images: int = 0


@dataclass(frozen=True)
class ModelCard:
    name: str
    version: int
    task: str
    labels: list[str]
    input: TensorSpec
    layout: str
    outputs: list[TensorSpec]
    dataset: dict[str, Any]
    metrics: dict[str, Any]
    training: dict[str, Any]
    sha256: str
    batching: BatchingSpec = field(default_factory=BatchingSpec)
    quantization: dict[str, Any] | None = None
    # grey level 0..255 around the training images (median of their border pixels): the service composites
    # transparent upload pixels on it, and inverts or levels uploads for a black or white one (serving.images).
    # None: not recorded (cards written before it existed): uploads are composited on black, never inverted
    input_background: int | None = None
    # for a black or white input_background (plain_background): the median share of a training image's longer
    # side that the box around its strokes (pixels over INK_GAP grey levels from the background, in any channel)
    # fills; the service frames uploads of another size to it (serving.images). None: not recorded (cards written
    # before it existed; an MNIST card is then taken at MNIST's own 20 of 28) or not plain
    input_strokes_share: float | None = None
    # temperature scaling folded into the graph: temperature(s), method, ECE / NLL / Brier before and after on
    # val and test (see training.calibration); None for models exported before calibration existed
    calibration: dict[str, Any] | None = None
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise CardError(f"task {self.task!r} is not one of {TASKS}")
        if self.layout not in LAYOUTS:
            raise CardError(f"layout {self.layout!r} is not one of {sorted(LAYOUTS)}")
        if len(self.input.shape) != LAYOUTS[self.layout]:
            raise CardError(f"input shape {self.input.shape} does not fit layout {self.layout}")
        if self.input.name != INPUT_NAME or self.input.datatype != "UINT8":
            raise CardError(f"input must be {INPUT_NAME!r} UINT8, got {self.input}")
        if not any(o.name == PROBS_NAME for o in self.outputs):
            raise CardError(f"outputs must include {PROBS_NAME!r}")
        if self.probs.shape != [len(self.labels)]:
            raise CardError(f"{PROBS_NAME} shape {self.probs.shape} != number of labels {len(self.labels)}")
        background = self.input_background
        if background is not None and (not isinstance(background, int) or not 0 <= background <= 255):
            raise CardError(f"input_background must be a grey level 0..255, got {background!r}")
        share = self.input_strokes_share
        if share is not None and (isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1):
            raise CardError(f"input_strokes_share must be a share of the image in (0, 1], got {share!r}")
        if self.version < 1:
            raise CardError(f"version must be a positive integer, got {self.version}")

    @property
    def probs(self) -> TensorSpec:
        return next(o for o in self.outputs if o.name == PROBS_NAME)

    @property
    def multi_label(self) -> bool:
        return self.task == "multi-label, binary-class"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCard:
        try:
            fields = dict(data)
            if fields.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
                raise CardError(f"unsupported card schema_version {fields['schema_version']}")
            fields["input"] = TensorSpec(**fields["input"])
            fields["outputs"] = [TensorSpec(**o) for o in fields["outputs"]]
            fields["batching"] = BatchingSpec(**fields.get("batching") or {})
            return cls(**fields)
        except (KeyError, TypeError) as exc:
            raise CardError(f"malformed model card: {exc}") from exc

    def metadata_props(self) -> dict[str, str]:
        """The key fields, as strings, for ONNX ``metadata_props``."""
        return {
            "cnnserve.name": self.name,
            "cnnserve.version": str(self.version),
            "cnnserve.task": self.task,
            "cnnserve.labels": json.dumps(self.labels),
            "cnnserve.layout": self.layout,
            "cnnserve.input_shape": json.dumps(self.input.shape),
        }


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_card(path: Path) -> ModelCard:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise CardError(f"model card {path} is missing") from exc
    except json.JSONDecodeError as exc:
        raise CardError(f"model card {path} is not valid JSON: {exc}") from exc
    return ModelCard.from_dict(data)


@contextmanager
def atomic_write(path: Path | str, mode: str = "w", newline: str | None = None,
                 durable: bool = True) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` for writing, text (``mode="w"``, with ``newline`` as ``open``
    takes it) or binary (``"wb"``); on a clean exit, flush it to disk (``durable``) and rename it over ``path``,
    so readers see the old file or the whole new one, never a part. On an error the temporary file is removed.
    ``durable=False`` skips the ``fsync`` (hundreds of µs, far more on a busy disk) for files that only running
    processes read, which a crash discards anyway."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', not {mode!r}")
    path = Path(path)
    # a new file of a name no one else uses; unlike tempfile's, its permissions follow the umask, as open()'s do
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, mode.replace("w", "x"), newline=newline) as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path | str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see ``atomic_write``)."""
    with atomic_write(path) as f:
        f.write(text)


def write_json_atomic(path: Path | str, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path``, atomically (see ``atomic_write``)."""
    with atomic_write(path) as f:
        json.dump(data, f, indent=2)
        f.write("\n")
