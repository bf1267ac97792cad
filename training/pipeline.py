"""The shipped models end to end (``training.shipped``): train, evaluate and export mnist-cnn,
pneumoniamnist-cnn and pneumoniamnist-transfer (whose backbone is, offline, the mnist-cnn trained just
before it)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from training.config import CHECKPOINT_BACKBONE, TrainConfig
from training.export import export_checkpoint
from training.shipped import SHIPPED
from training.train import CHECKPOINT, train

# what makes a model another model: the pipeline publishes under the shipped names, so it cannot take these
IDENTITY_KEYS = ("name", "dataset", "size", "arch")


def run_pipeline(args: argparse.Namespace, overrides: dict[str, Any], command: str) -> list[Path]:
    changed = sorted(set(overrides) & set(IDENTITY_KEYS))
    if changed:
        raise ValueError(f"the pipeline trains the shipped models under their names: --set {', '.join(changed)} "
                         "would publish another model as them; use `python -m training train CONFIG --set ...`")
    published = []
    for model in SHIPPED:
        name = model.name
        if args.only and name not in args.only:
            continue
        step_overrides, notes = dict(overrides), ""
        if model.backbone_from:
            if args.backbone == CHECKPOINT_BACKBONE:
                source = args.runs_dir / model.backbone_from / CHECKPOINT
                if not source.exists():
                    raise FileNotFoundError(f"{source} not found: the transfer model reuses the {model.backbone_from} "
                                            f"backbone, so train {model.backbone_from} first (or pass --backbone "
                                            "resnet18)")
                # our backbone was trained at 28x28: no resize
                step_overrides.update(backbone=CHECKPOINT_BACKBONE, backbone_checkpoint=str(source), input_size=None)
                notes = (f"Backbone: the features of this project's {model.backbone_from}, trained in the same "
                         "pipeline run (torchvision ImageNet weights cannot be downloaded offline).")
            else:
                step_overrides.update(backbone=args.backbone, input_size=64)
                notes = f"Backbone: torchvision {args.backbone} with ImageNet weights."
        cfg = TrainConfig.load(model.config, {**step_overrides, "name": name})
        result = train(cfg, args.runs_dir / name, args.data_dir, args.download, args.resume, args.device, args.quiet)
        if not result.metrics:  # a non-zero DDP rank: rank 0 evaluates and publishes
            continue
        path = export_checkpoint(result.run_dir / CHECKPOINT, args.model_dir, name, args.data_dir, args.download,
                                 model.quantize, command=command, notes=notes)
        print(f"[{name}] exported {path}")
        published.append(path)
    return published
