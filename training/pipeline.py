"""The shipped models end to end: train, evaluate and export mnist-cnn, pneumoniamnist-cnn and
pneumoniamnist-transfer (whose backbone is, offline, the mnist-cnn trained just before it)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from training.config import TrainConfig
from training.export import export_checkpoint
from training.models import CHECKPOINT_BACKBONE
from training.train import CHECKPOINT, train

STEPS = (("mnist-cnn", "mnist"), ("pneumoniamnist-cnn", "pneumoniamnist"),
         ("pneumoniamnist-transfer", "pneumoniamnist-transfer"))


def run_pipeline(args: argparse.Namespace, overrides: dict[str, Any], command: str) -> list[Path]:
    published = []
    for name, config in STEPS:
        if args.only and name not in args.only:
            continue
        step_overrides, notes = dict(overrides), ""
        if name == "pneumoniamnist-transfer":
            if args.backbone == CHECKPOINT_BACKBONE:
                source = args.runs_dir / "mnist-cnn" / CHECKPOINT
                if not source.exists():
                    raise FileNotFoundError(f"{source} not found: the transfer model reuses the mnist-cnn backbone, "
                                            "so train mnist-cnn first (or pass --backbone resnet18)")
                # our backbone was trained at 28x28: no resize
                step_overrides.update(backbone=CHECKPOINT_BACKBONE, backbone_checkpoint=str(source), input_size=None)
                notes = ("Backbone: the features of this project's mnist-cnn, trained in the same pipeline run "
                         "(torchvision ImageNet weights cannot be downloaded offline).")
            else:
                step_overrides.update(backbone=args.backbone, input_size=64)
                notes = f"Backbone: torchvision {args.backbone} with ImageNet weights."
        cfg = TrainConfig.load(config, {**step_overrides, "name": name})
        result = train(cfg, args.runs_dir / name, args.data_dir, args.download, args.resume, args.device, args.quiet)
        if not result.metrics:  # a non-zero DDP rank: rank 0 evaluates and publishes
            continue
        path = export_checkpoint(result.run_dir / CHECKPOINT, args.model_dir, name, args.data_dir, args.download,
                                 command=command, notes=notes)
        print(f"[{name}] exported {path}")
        published.append(path)
    return published
