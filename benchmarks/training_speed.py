"""Training speed on this machine: images/s per model, the data pipeline's share of a step, and MNIST
wall time to 99.0 % test accuracy.

    python -m benchmarks.training_speed --data-dir ../shared/data

Writes benchmarks/results/training_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from benchmarks.publish import write_results
from training.augment import BatchAugment
from training.checkpoint import load_model
from training.config import TrainConfig
from training.data import Batches, dataset_spec, load_split
from training.models import build_model
from training.train import make_loss, make_optimizer, train

ROOT = Path(__file__).resolve().parents[1]

MODELS = ("mnist", "pneumoniamnist", "retinamnist", "adrenalmnist3d")


def step_speed(cfg: TrainConfig, data_dir: Path, steps: int, backbone_source=None) -> dict:
    """img/s of full training steps, and the seconds of the data part (batching, preprocessing,
    augmentation) measured alone over the same batches."""
    spec = dataset_spec(cfg.dataset, cfg.size)
    split = load_split(spec, "train", data_dir, download=False)
    torch.manual_seed(0)
    model = build_model(spec, cfg, backbone_source).train()
    if cfg.channels_last and not spec.is_3d:  # as training.train does
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, model)
    loss_fn = make_loss(spec.task, cfg.label_smoothing)
    augment = BatchAugment(cfg.augment)
    batches = Batches(split, cfg.batch_size, shuffle=True, drop_last=True)
    multi_label = spec.task.startswith("multi-label")

    def data_part(images: torch.Tensor) -> torch.Tensor:
        x = model.preprocess(images)
        return augment(x) if augment.active else x

    def endless():
        while True:
            yield from batches

    def run(full: bool) -> float:
        it = endless()
        for _ in range(3):  # warm-up
            next(it)
        t0 = time.perf_counter()
        for _ in range(steps):
            images, labels = next(it)
            if full:
                logits = model(images, augment if augment.active else None)
                loss = loss_fn(logits, labels.float() if multi_label else labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            else:
                with torch.no_grad():
                    data_part(images)
        return time.perf_counter() - t0

    step_s, data_s = run(True), run(False)
    return {"model": cfg.name, "batch_size": cfg.batch_size, "img_per_s": steps * cfg.batch_size / step_s,
            "step_ms": 1000 * step_s / steps, "data_ms": 1000 * data_s / steps, "data_share": data_s / step_s}


def time_to_accuracy(data_dir: Path, work: Path) -> dict:
    cfg = TrainConfig.load("mnist-fast")
    t0 = time.perf_counter()
    result = train(cfg, work / "mnist-fast", data_dir, download=False, quiet=True, report=False)
    return {"config": "training/configs/mnist-fast.yaml", "epochs": cfg.epochs, "wall_s": time.perf_counter() - t0,
            "test_acc": result.metrics["acc"], "reached_99": result.metrics["acc"] >= 0.99}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "benchmark-speed")
    args = parser.parse_args()
    rows = [step_speed(TrainConfig.load(name), args.data_dir, args.steps) for name in MODELS]
    mnist_ckpt = ROOT / "runs" / "mnist-cnn" / "checkpoint.pt"
    transfer = TrainConfig.load("pneumoniamnist-transfer")
    if mnist_ckpt.exists():
        transfer = TrainConfig.from_dict({**transfer.to_dict(), "backbone": "checkpoint", "input_size": None})
        rows.append(step_speed(transfer, args.data_dir, args.steps, load_model(mnist_ckpt)[0]))
    tta = time_to_accuracy(args.data_dir, args.work_dir)
    command = shlex.join(["python", "-m", "benchmarks.training_speed", *sys.argv[1:]])
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
               "device": "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name()}
    lines = ["# Training speed", "", f"`{command}` on {machine['cores']} cores ({machine['device']}, "
             f"torch {machine['torch']}, {machine['torch_threads']} threads).", "",
             "| model | batch | img/s | step ms | data ms | data share |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['batch_size']} | {r['img_per_s']:.0f} | {r['step_ms']:.1f} | {r['data_ms']:.2f} | "
              f"{100 * r['data_share']:.1f} % |" for r in rows]
    lines += ["", "Data = batch indexing from the in-memory uint8 split + uint8->float normalisation + the batched "
              "random affine, timed alone over the same batches; a step adds forward, backward and the optimizer.",
              "", "## MNIST: wall time to 99.0 % test accuracy", "",
              f"`{tta['config']}` ({tta['epochs']} epochs, data loading and test evaluation included): "
              f"**{tta['wall_s']:.1f} s**, test accuracy {100 * tta['test_acc']:.2f} % "
              f"({'reached' if tta['reached_99'] else 'NOT reached'} 99.0 %; goal ≤ 30 s)."]
    print(write_results("training_speed", {"command": command, "machine": machine, "steps": rows,
                                           "mnist_time_to_99": tta}, "\n".join(lines) + "\n"))


if __name__ == "__main__":
    main()
