"""The models this project ships in ``exports/``, in training order, with their targets: the one list the
CLI (``python -m training shipped``), the pipeline, the Makefile, the benchmarks and the tests read.

Torch-free on purpose: ``make models`` asks for the names with only the ``serve`` extra installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from training.config import CONFIG_DIR


@dataclass(frozen=True)
class Targets:
    """The test-split scores a model must reach (None: no target)."""

    acc: float | None = None
    auc: float | None = None

    def met(self, measured: dict[str, Any]) -> bool | None:
        """Whether ``measured`` (``acc``, ``auc``) reaches every target; None when there is none."""
        goals = [(key, goal) for key, goal in (("acc", self.acc), ("auc", self.auc)) if goal is not None]
        return all(measured[key] >= goal for key, goal in goals) if goals else None


@dataclass(frozen=True)
class ModelEntry:
    """One model: its name in the model repository, its config in ``training/configs/`` and its targets."""

    name: str
    config: str
    targets: Targets = Targets()
    backbone_from: str | None = None  # pipeline: reuse this earlier model's checkpoint as the backbone, offline
    quantize: str | None = None  # pipeline: publish it quantised (``export --quantize``); its checkpoint stays float

    @property
    def dataset(self) -> str:
        return yaml.safe_load((CONFIG_DIR / f"{self.config}.yaml").read_text())["dataset"]


SHIPPED: tuple[ModelEntry, ...] = (
    ModelEntry("mnist-cnn", "mnist", Targets(acc=0.994), quantize="int8"),
    ModelEntry("pneumoniamnist-cnn", "pneumoniamnist", Targets(acc=0.90, auc=0.97)),
    ModelEntry("pneumoniamnist-transfer", "pneumoniamnist-transfer", backbone_from="mnist-cnn"),
)
SHIPPED_NAMES = tuple(m.name for m in SHIPPED)


def shipped(name: str) -> ModelEntry:
    """The shipped model called ``name``."""
    for entry in SHIPPED:
        if entry.name == name:
            return entry
    raise ValueError(f"{name!r} is not a shipped model; shipped: {', '.join(SHIPPED_NAMES)}")
