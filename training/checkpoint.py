"""Checkpoints: written atomically every epoch, loaded safely (``weights_only=True``); what one holds
(``training_state``) and how a run continues from it (``restore_training``)."""

from __future__ import annotations

import math
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from serving.model_card import atomic_write
from training.config import TrainConfig
from training.data import dataset_spec
from training.models import CHECKPOINT_BACKBONE, Classifier, Ensemble, build_model


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` to ``path`` atomically: never half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as f:
        torch.save(state, f)


def read_file(path: Path) -> Any:
    """What ``torch.save`` wrote to ``path``, loaded safely; a clear error for a directory (an export's version
    directory) or a file that is not one (an export's ``model.onnx``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} not found")
    if path.is_dir() or path.suffix == ".onnx":
        raise ValueError(f"{path} is {'a directory' if path.is_dir() else 'an ONNX export'}, not a checkpoint: "
                         "training writes runs/<name>/checkpoint.pt (an export holds no PyTorch weights to train "
                         "from)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:  # unreadable: permissions, an I/O error
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()  # torch colours parts of its messages
        if "Weights only load failed" in text and "Unsupported operand" not in text:  # e.g. torch.save(model)
            raise ValueError(f"{path} holds pickled Python objects, not a checkpoint or a state dict (save "
                             "model.state_dict() instead of the model)") from None
        reason = "not a file torch.save wrote" if "Weights only load failed" in text or not text else \
            text.splitlines()[0][:160]
        raise ValueError(f"{path} is not a PyTorch checkpoint ({reason})") from None


def is_training_checkpoint(value: Any) -> bool:
    """Whether a loaded file is a checkpoint of this project's training (not, e.g., a torchvision state dict)."""
    return isinstance(value, dict) and "config" in value


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint this project's training wrote."""
    ckpt = read_file(path)
    if not is_training_checkpoint(ckpt):
        raise ValueError(f"{path} is not a checkpoint of this project's training (it has no 'config'); a "
                         "torchvision state dict is a backbone for its architecture: --set backbone=resnet18 "
                         f"--set backbone_checkpoint={path}")
    return ckpt


@dataclass
class Progress:
    """What the training loop carries from one epoch to the next, and a checkpoint keeps for ``--resume``."""

    epochs_done: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_metric: float = -math.inf
    best_model: dict[str, torch.Tensor] | None = None  # weights of the best-on-val epoch, on the CPU
    stale_epochs: int = 0  # epochs since the best one (early stopping)

    def record(self, row: dict[str, float], metric: float, model: nn.Module, lower_is_better: bool = False) -> bool:
        """Add one finished epoch (its history ``row`` and validation ``metric``, of ``model``); whether it is the
        best yet (the first epoch always is)."""
        self.history.append(row)
        self.epochs_done += 1
        better = metric < self.best_metric if lower_is_better else metric > self.best_metric
        if self.best_model is None or better:
            self.best_metric, self.stale_epochs = metric, 0
            self.best_model = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            return True
        self.stale_epochs += 1
        return False


def training_state(cfg: TrainConfig, backbone_source_config: dict[str, Any] | None, model: nn.Module,
                   optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                   progress: Progress, device: torch.device, ema: nn.Module | None = None) -> dict[str, Any]:
    """The checkpoint after ``progress.epochs_done`` epochs: everything ``restore_training`` needs to continue
    exactly as if never stopped (weights, optimizer, schedule, random state), plus the best weights."""
    return {
        "config": cfg.to_dict(), "backbone_source_config": backbone_source_config, "epoch": progress.epochs_done - 1,
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "history": progress.history, "best_metric": progress.best_metric, "best_model": progress.best_model,
        "stale_epochs": progress.stale_epochs, "ema": ema.state_dict() if ema is not None else None,
    }


def restore_training(state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
                     scheduler: torch.optim.lr_scheduler.LRScheduler, device: torch.device,
                     ema: nn.Module | None = None) -> Progress:
    """Load a ``training_state`` checkpoint into ``model``, ``optimizer``, ``scheduler``, the weight average
    ``ema`` (if any) and the random generators; returns the loop's progress."""
    model.load_state_dict(state["model"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_cpu"])
    if device.type == "cuda" and state.get("rng_cuda") is not None:
        torch.cuda.set_rng_state(state["rng_cuda"], device)
    return Progress(state["epoch"] + 1, state["history"], state["best_metric"], state["best_model"],
                    state["stale_epochs"])


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
