"""Training configuration: a YAML file in ``training/configs/`` plus command-line overrides."""

from __future__ import annotations

import copy
import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"
CACHE_DIR = Path(os.environ.get("CNNSERVE_CACHE", Path.home() / ".cache" / "cnnserve"))
DEFAULT_DATA_DIR = Path(os.environ.get("CNNSERVE_DATA", CACHE_DIR / "data"))

# the values the enum-like fields take
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # it names folders: runs/<name>, <repository>/<name>
MIN_AGREEMENT = 0.99  # share of test decisions an int8 version must share with its float source to be published
ARCHS = ("cnn", "transfer")
CHECKPOINT_BACKBONE = "checkpoint"  # a cnnserve training checkpoint (e.g. our own mnist-cnn)
TORCHVISION_INPUT_SIZE = 64  # the side a torchvision backbone's input is resized to when input_size is null
TRANSFER_ONLY = ("backbone", "backbone_checkpoint", "pretrained", "freeze", "head_epochs", "backbone_lr_scale")
BACKBONES = ("resnet18", "mobilenet_v3_small", "efficientnet_b0", CHECKPOINT_BACKBONE)
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("onecycle", "cosine", "constant")
SELECT_METRICS = ("acc", "auc", "acc+auc", "nll")
LOWER_IS_BETTER = ("nll",)


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
    arch: str = "cnn"  # ARCHS
    widths: list[int] = field(default_factory=lambda: [32, 64, 128])
    dropout: float = 0.3
    backbone: str = "resnet18"  # BACKBONES
    backbone_checkpoint: str | None = None
    pretrained: bool = True
    input_size: int | None = None
    highpass: float | None = None  # subtract a Gaussian blur of this sigma (pixels): see models.Preprocess
    freeze: bool = False  # linear probe: train the head only
    head_epochs: int = 0  # staged fine-tuning: this many head-only epochs first
    # optimisation
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "adamw"  # OPTIMIZERS
    lr: float = 3e-3
    backbone_lr_scale: float = 1.0  # backbone learning rate = lr * this (transfer models)
    weight_decay: float = 1e-4
    momentum: float = 0.9
    schedule: str = "onecycle"  # SCHEDULES
    label_smoothing: float = 0.0
    patience: int = 0  # early stopping: epochs without val improvement (0 = off)
    # val metric for model selection: acc, auc, acc+auc, or nll (the NLL after temperature scaling, lower is
    # better: all images count, not only those near a threshold); default: acc for MNIST, else auc
    select: str | None = None
    # weight EMA averaging over about this fraction of the run's optimiser steps (e.g. 0.05); validation,
    # selection and the exported model then use the averaged weights (null = off)
    ema: float | None = None
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
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in data
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ValueError(f"the config has no {' or '.join(repr(m) for m in missing)}: a config names at least "
                             "what it trains (name: my-model, dataset: a dataset flag)")
        augment = data.get("augment") or {}
        if not isinstance(augment, dict):
            raise ValueError(f"config key 'augment' is {augment!r}; give a mapping of augmentations "
                             "(augment: {hflip: true}), or nothing")
        variants = data.get("ensemble_variants") or []
        if not isinstance(variants, list) or not all(isinstance(v, dict) for v in variants):
            raise ValueError(f"config key 'ensemble_variants' is {variants!r}; give a list of config overrides "
                             "([{}, {highpass: null}])")
        known_augment = [f.name for f in dataclasses.fields(Augment)]
        unknown = set(augment) - set(known_augment)
        if unknown:
            raise ValueError(f"unknown augment keys: {sorted(unknown)}; known: {known_augment}")
        data["augment"] = Augment(**augment)
        cfg = cls(**data)
        if cfg.backbone_checkpoint:  # however the file was named (flag, --set, YAML, the pipeline):
            cfg.pretrained = False  # its weights, not ImageNet's, and the card must not say otherwise;
            cfg.backbone_checkpoint = str(Path(cfg.backbone_checkpoint).resolve())  # named wherever it is read
        cfg.validate()
        if cfg.ensemble_variants and cfg.ensemble < 2:
            raise ValueError("ensemble_variants needs ensemble: N with N >= 2 (the members to spread them over)")
        for k in range(min(cfg.ensemble, len(cfg.ensemble_variants))):
            cfg.member(k)  # a bad variant fails when the config is read, not after hours of training
        return cfg

    def validate(self) -> None:
        """Raise one clear ``ValueError`` (key, value, what is allowed) for the first bad field."""
        for obj, prefix in ((self, ""), (self.augment, "augment.")):
            for f in dataclasses.fields(obj):
                _check_type(prefix + f.name, getattr(obj, f.name), f.type)
        _check_choice("arch", self.arch, ARCHS)
        _check_choice("backbone", self.backbone, BACKBONES)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_choice("select", self.select, (None, *SELECT_METRICS))
        for key in ("epochs", "batch_size", "eval_batch_size", "ensemble", "train_limit", "input_size"):
            _check_range(key, getattr(self, key), 1)
        for key in ("head_epochs", "patience", "lr", "backbone_lr_scale", "weight_decay", "momentum"):
            _check_range(key, getattr(self, key), 0)
        for key in ("dropout", "label_smoothing", "ema"):
            _check_range(key, getattr(self, key), 0, below=1)
        if not isinstance(self.widths, list) or not self.widths or any(
                not isinstance(w, int) or isinstance(w, bool) or w < 1 for w in self.widths):
            raise ValueError(f"config key 'widths' is {self.widths!r}; give one or more positive channel counts")
        if self.highpass is not None and self.highpass <= 0:
            raise ValueError(f"config key 'highpass' is {self.highpass!r}; give a blur sigma > 0, or null for none")
        for f in dataclasses.fields(Augment):
            _check_range(f"augment.{f.name}", getattr(self.augment, f.name), 0)
        self._validate_dataset()

    def _validate_dataset(self) -> None:
        """``dataset`` and ``size`` exist, and the model suits the dataset's images."""
        from training.data import available_sizes, dataset_flags, dataset_spec  # medmnist imports torch

        _check_choice("dataset", self.dataset, dataset_flags())
        _check_choice("size", self.size, available_sizes(self.dataset), f"sizes of {self.dataset}")
        if dataset_spec(self.dataset, self.size).is_3d:
            if self.arch == "transfer":
                raise ValueError(f"config key 'arch' is 'transfer', but {self.dataset} is 3D and transfer "
                                 "backbones are 2D; use arch 'cnn'")
            if self.highpass is not None:
                raise ValueError(f"config key 'highpass' is {self.highpass!r}, but {self.dataset} is 3D and "
                                 "highpass is for 2D images; use null")

    def check_trainable(self) -> None:
        """Raise one clear ``ValueError`` for settings a run may not start with (checked as training starts, not
        when a checkpoint's config is read back: runs made before these checks still evaluate and export)."""
        from training.data import dataset_spec

        check_model_name(self.name, "config key 'name'")
        if self.augment.hflip and (sided := sided_labels(dataset_spec(self.dataset, self.size).labels)):
            raise ValueError(f"config key 'augment.hflip' is true, but {self.dataset}'s labels name sides "
                             f"({', '.join(sided[:4])}): a flipped left organ would keep its 'left' label; "
                             "use false")
        if self.freeze and self.arch != "transfer":
            raise ValueError(f"config key 'freeze' is true, but arch is {self.arch!r}: freezing is for a "
                             "transfer model's backbone (--set arch=transfer makes it one)")

    @classmethod
    def load(cls, path: Path | str, overrides: dict[str, Any] | None = None) -> TrainConfig:
        path = Path(path)
        if not path.exists() and (CONFIG_DIR / f"{path}.yaml").exists():
            path = CONFIG_DIR / f"{path}.yaml"
        data = read_yaml(path.read_text(), str(path)) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path} holds a YAML {type(data).__name__}, not a mapping of config keys")
        return cls.from_dict(with_overrides(data, overrides or {}))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def recorded(self) -> dict[str, Any]:
        """The config as a model card records it: what shaped this model. A CNN's leaves out the transfer-only
        keys (their defaults read "backbone resnet18, pretrained" on every CNN's card); a transfer model over a
        torchvision backbone records the input size it was fed (null read as none)."""
        data = self.to_dict()
        if self.arch != "transfer":
            for key in TRANSFER_ONLY:
                data.pop(key)
        elif self.backbone != CHECKPOINT_BACKBONE and self.input_size is None:
            data["input_size"] = TORCHVISION_INPUT_SIZE
        return data

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
            return self.select
        return "acc" if self.dataset == "mnist" else "auc"

    @property
    def select_lower_is_better(self) -> bool:
        return self.select_metric in LOWER_IS_BETTER


_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "int": ((int,), "an integer"), "float": ((int, float), "a number"), "bool": ((bool,), "true or false"),
    "str": ((str,), "a string"),
}


SIDES = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def sided_labels(labels: tuple[str, ...]) -> list[str]:
    """The labels that name a side of the body (OrganMNIST's kidney-left, kidney-right, ...): a left-right flip
    turns one into the other."""
    return [label for label in labels if SIDES.search(label)]


def _check_type(key: str, value: Any, annotation: str) -> None:
    """Scalar fields hold their annotated type (``int | None`` may also be null); bools are not numbers."""
    base, optional = annotation.removesuffix(" | None"), annotation.endswith(" | None")
    if base not in _TYPES or (optional and value is None):
        return
    types, wanted = _TYPES[base]
    if not isinstance(value, types) or (base != "bool" and isinstance(value, bool)):
        raise ValueError(f"config key {key!r} is {value!r}; give {wanted}" + (" or null" if optional else ""))


def _check_choice(key: str, value: Any, choices: tuple | list, what: str = "") -> None:
    if value not in choices:
        raise ValueError(f"config key {key!r} is {value!r}; choose from {', '.join(map(str, choices))}"
                         + (f" ({what})" if what else ""))


def _check_range(key: str, value: float | None, minimum: float, below: float | None = None) -> None:
    """``minimum <= value`` (and ``value < below`` when given); None passes (an optional field left out)."""
    if value is None or (value >= minimum and (below is None or value < below)):
        return
    allowed = f">= {minimum}" + (f" and < {below}" if below is not None else "")
    raise ValueError(f"config key {key!r} is {value!r}; it must be {allowed}")


def config_names() -> list[str]:
    """The YAML configs in ``training/configs/``, by name."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def with_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``data`` with ``overrides`` set; a dotted key sets one nested field (``augment.hflip``)."""
    data = copy.deepcopy(data)
    for key, value in overrides.items():
        target = data
        *parents, leaf = key.split(".")
        for p in parents:
            target = target.setdefault(p, {})
            if not isinstance(target, dict):
                raise ValueError(f"override {key!r}: {p!r} holds a value, not keys")
        target[leaf] = value
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with a YAML value: ``epochs=3``, ``augment.hflip=true``, ``widths=[16,32]``."""
    if "=" not in text:
        raise ValueError(f"override {text!r} is not key=value")
    key, value = text.split("=", 1)
    return key.strip(), read_yaml(value, f"override {text!r}")


def check_model_name(name: str, what: str) -> None:
    """Raise one clear ``ValueError`` unless ``name`` (given as ``what``) can name a model's folders."""
    if not MODEL_NAME.fullmatch(name):
        raise ValueError(f"{what} is {name!r}; give a folder name: letters, digits, '.', '-' and '_', starting with "
                         "a letter or digit")


def read_yaml(text: str, what: str) -> Any:
    """``text`` parsed as YAML, or a ``ValueError`` naming ``what`` and where it is wrong (not PyYAML's traceback)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{what} is not valid YAML: {' '.join(str(exc).split())}") from None
