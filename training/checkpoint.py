"""Checkpoints: written atomically every epoch, loaded safely (``weights_only=True``)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from training.config import TrainConfig
from training.data import dataset_spec
from training.models import CHECKPOINT_BACKBONE, Classifier, Ensemble, build_model


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` to a temporary file beside ``path`` and rename it over: never half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_checkpoint(path: Path) -> dict[str, Any]:
    if not Path(path).exists():
        raise FileNotFoundError(f"checkpoint {path} not found")
    return torch.load(path, map_location="cpu", weights_only=True)


def skeleton(cfg: TrainConfig, backbone_source_config: dict[str, Any] | None = None) -> Classifier:
    """An untrained model of the architecture ``cfg`` describes, without fetching any weights."""
    cfg = TrainConfig.from_dict({**cfg.to_dict(), "pretrained": False, "backbone_checkpoint": None})
    source = None
    if cfg.arch == "transfer" and cfg.backbone == CHECKPOINT_BACKBONE:
        source = skeleton(TrainConfig.from_dict(backbone_source_config or {}))
    return build_model(dataset_spec(cfg.dataset, cfg.size), cfg, source)


def ensemble_from_checkpoint(ckpt: dict[str, Any]) -> Ensemble:
    """The ``Ensemble`` (in eval mode) that an ensemble checkpoint describes."""
    members = []
    for member in ckpt["members"]:
        model = skeleton(TrainConfig.from_dict(member["config"]), member["backbone_source_config"])
        model.load_state_dict(member["model"])
        members.append(model)
    cfg = TrainConfig.from_dict(ckpt["config"])
    return Ensemble(members, dataset_spec(cfg.dataset, cfg.size).task.startswith("multi-label")).eval()


def load_model(path: Path, best: bool = True) -> tuple[Classifier | Ensemble, TrainConfig, dict[str, Any]]:
    """Rebuild a trained model from a checkpoint: (model in eval mode, its config, the checkpoint).

    An ensemble's checkpoint holds each member's config and selected weights (``best`` does not apply)."""
    ckpt = read_checkpoint(path)
    cfg = TrainConfig.from_dict(ckpt["config"])
    if "members" in ckpt:
        return ensemble_from_checkpoint(ckpt), cfg, ckpt
    model = skeleton(cfg, ckpt.get("backbone_source_config"))
    model.load_state_dict(ckpt["best_model"] if best and ckpt.get("best_model") else ckpt["model"])
    return model.eval(), cfg, ckpt
