"""Training configuration: a YAML file in ``training/configs/`` plus command-line overrides."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class Augment:
    """Random per-sample augmentation on the normalised batch (see ``training.augment``)."""

    translate: float = 0.0  # max shift, fraction of the side
    rotate: float = 0.0  # max rotation in degrees (2D)
    scale: float = 0.0  # max relative zoom in or out
    hflip: bool = False
    brightness: float = 0.0  # max shift, as a fraction of the batch's pixel range
    contrast: float = 0.0  # max relative change of contrast around each image's mean


@dataclass
class TrainConfig:
    name: str
    dataset: str
    size: int = 28
    # model
    arch: str = "cnn"  # cnn | transfer
    widths: list[int] = field(default_factory=lambda: [32, 64, 128])
    dropout: float = 0.3
    backbone: str = "resnet18"  # resnet18 | mobilenet_v3_small | efficientnet_b0 | checkpoint
    backbone_checkpoint: str | None = None
    pretrained: bool = True
    input_size: int | None = None
    highpass: float | None = None  # subtract a Gaussian blur of this sigma (pixels): see models.Preprocess
    freeze: bool = False  # linear probe: train the head only
    head_epochs: int = 0  # staged fine-tuning: this many head-only epochs first
    # optimisation
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 3e-3
    backbone_lr_scale: float = 1.0  # backbone learning rate = lr * this (transfer models)
    weight_decay: float = 1e-4
    momentum: float = 0.9
    schedule: str = "onecycle"  # onecycle | cosine | constant
    label_smoothing: float = 0.0
    patience: int = 0  # early stopping: epochs without val improvement (0 = off)
    select: str | None = None  # val metric for model selection: acc, auc or acc+auc (default: acc for MNIST, else auc)
    augment: Augment = field(default_factory=Augment)
    seed: int = 0
    ensemble: int = 1  # train this many members (seeds seed, seed+1, ...) and average their probabilities
    # member k of an ensemble takes the overrides ensemble_variants[k % len] (keys as --set takes them)
    ensemble_variants: list[dict[str, Any]] = field(default_factory=list)
    # data
    train_limit: int | None = None  # use only the first N training images (smoke tests)
    eval_batch_size: int = 512
    # runtime
    amp: bool = True  # CUDA only
    channels_last: bool = True  # 2D models
    compile: bool = False

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}; known: {sorted(known)}")
        data = dict(data)
        data["augment"] = Augment(**(data.get("augment") or {}))
        cfg = cls(**data)
        if cfg.ensemble_variants and cfg.ensemble < 2:
            raise ValueError("ensemble_variants needs ensemble: N with N >= 2 (the members to spread them over)")
        for k in range(min(cfg.ensemble, len(cfg.ensemble_variants))):
            cfg.member(k)  # a bad variant fails when the config is read, not after hours of training
        return cfg

    @classmethod
    def load(cls, path: Path | str, overrides: dict[str, Any] | None = None) -> TrainConfig:
        path = Path(path)
        if not path.exists() and (CONFIG_DIR / f"{path}.yaml").exists():
            path = CONFIG_DIR / f"{path}.yaml"
        return cls.from_dict(with_overrides(yaml.safe_load(path.read_text()) or {}, overrides or {}))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def variant(self, k: int) -> dict[str, Any]:
        """The config overrides of ensemble member ``k``: ``ensemble_variants`` taken in turn."""
        return self.ensemble_variants[k % len(self.ensemble_variants)] if self.ensemble_variants else {}

    def member(self, k: int) -> TrainConfig:
        """Member ``k`` of an ensemble: seed ``seed + k``, with the overrides of ``variant(k)`` (members that
        see their inputs differently make a more diverse ensemble)."""
        overrides = self.variant(k)
        refused = {"name", "seed", "ensemble", "ensemble_variants"} & set(overrides)
        if refused:
            raise ValueError(f"ensemble_variants may not set {sorted(refused)}: members get them from the ensemble")
        fixed = {"name": f"{self.name}-m{k}", "seed": self.seed + k, "ensemble": 1, "ensemble_variants": []}
        return TrainConfig.from_dict(with_overrides(self.to_dict(), {**overrides, **fixed}))

    @property
    def select_metric(self) -> str:
        """Validation metric used for model selection and early stopping."""
        if self.select is not None:
            if self.select not in ("acc", "auc", "acc+auc"):
                raise ValueError(f"select must be acc, auc or acc+auc, not {self.select!r}")
            return self.select
        return "acc" if self.dataset == "mnist" else "auc"


def with_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``data`` with ``overrides`` set; a dotted key sets one nested field (``augment.hflip``)."""
    data = copy.deepcopy(data)
    for key, value in overrides.items():
        target = data
        *parents, leaf = key.split(".")
        for p in parents:
            target = target.setdefault(p, {})
        target[leaf] = value
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with a YAML value: ``epochs=3``, ``augment.hflip=true``, ``widths=[16,32]``."""
    if "=" not in text:
        raise ValueError(f"override {text!r} is not key=value")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)
