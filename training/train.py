"""The training loop: one model from a ``TrainConfig`` into a run directory.

Run directory contents: ``checkpoint.pt`` (last epoch, for ``--resume``; holds the best weights too),
``config.yaml``, ``history.csv``, ``metrics.json`` and the report (see ``training.report``); an ensemble's
also holds one such run directory per member, ``member-K/``.
Distributed data parallel when started by ``torchrun`` (gloo on CPU, nccl on CUDA).
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from serving.model_card import atomic_write, write_json_atomic, write_text_atomic
from training.augment import BatchAugment
from training.calibration import calibration_metrics, calibration_report, fit_temperature, probabilities
from training.checkpoint import (
    Progress,
    ensemble_from_checkpoint,
    load_model,
    read_checkpoint,
    restore_training,
    save_checkpoint,
    training_state,
)
from training.config import TORCHVISION_INPUT_SIZE, TrainConfig
from training.data import DEFAULT_DATA_DIR, Batches, DatasetSpec, Split, dataset_spec, load_split
from training.evaluate import full_metrics, headline_metrics, predict_logits
from training.models import CHECKPOINT_BACKBONE, Classifier, Ensemble, TransferNet, build_model, imagenet_weights

CHECKPOINT = "checkpoint.pt"


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, Any]  # test metrics of the selected (best-on-val) model
    epochs_run: int  # of the model (an ensemble: of its last member trained)
    stopped: bool = False  # left early as ``stop_after`` asked; continue with ``resume``


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name} was requested but no CUDA device is available")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device {name}: {exc}") from None


def setup_distributed(device: str) -> tuple[torch.device, int, int]:
    """(device, rank, world size). When launched by torchrun, initialises the process group: nccl for CUDA
    processes (each on the GPU of its ``LOCAL_RANK``), gloo for CPU ones (also on a machine with GPUs, when
    ``--device cpu`` asks for that)."""
    dev = resolve_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return dev, 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    return dev, dist.get_rank(), world


class SmoothedBCEWithLogits(nn.BCEWithLogitsLoss):
    """Binary cross-entropy per label against targets smoothed as ``CrossEntropyLoss(label_smoothing=s)`` smooths
    two classes: 1 -> 1 - s/2, 0 -> s/2 (a multi-label card said ``label_smoothing: 0.1`` while its loss took none)."""

    def __init__(self, label_smoothing: float) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return super().forward(logits, targets * (1 - self.label_smoothing) + self.label_smoothing / 2)


def make_loss(task: str, label_smoothing: float) -> nn.Module:
    if task == "multi-label, binary-class":
        return SmoothedBCEWithLogits(label_smoothing)
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)


def make_optimizer(cfg: TrainConfig, model: Classifier) -> torch.optim.Optimizer:
    head = list(model.net.head.parameters())
    head_ids = {id(p) for p in head}
    body = [p for p in model.parameters() if id(p) not in head_ids]
    groups = [{"params": body, "lr": cfg.lr * cfg.backbone_lr_scale}, {"params": head, "lr": cfg.lr}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; use adamw or sgd")


def make_scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer,
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle":
        max_lr = [g["lr"] for g in opt.param_groups]
        # 0.2 of 5 steps ends the warm-up at step 0, which OneCycleLR then divides by (ZeroDivisionError)
        pct_start = 0.3 if total == 5 else 0.2
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=total, pct_start=pct_start)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    if cfg.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    raise ValueError(f"unknown schedule {cfg.schedule!r}; use onecycle, cosine or constant")


def _check_before_data(cfg: TrainConfig, download: bool) -> None:
    """What would stop ``cfg``'s run, found before any data is loaded: its settings, and its backbone's weights
    (fetched now when they are ImageNet's and downloads are allowed)."""
    cfg.check_trainable()
    if cfg.arch == "transfer" and not cfg.backbone_checkpoint:
        if cfg.backbone == CHECKPOINT_BACKBONE:
            raise ValueError("backbone 'checkpoint' needs --backbone-checkpoint PATH")
        if cfg.pretrained:
            imagenet_weights(cfg.backbone, download)


def build_classifier(cfg: TrainConfig, spec: DatasetSpec, device: torch.device) -> tuple[Classifier, dict | None]:
    """The model to train on ``device``, and the config of the checkpoint its backbone comes from (if any)."""
    source, source_config = None, None
    if cfg.arch == "transfer" and cfg.backbone == CHECKPOINT_BACKBONE:  # its path: checked by train() first
        source, src_cfg, _ = load_model(Path(cfg.backbone_checkpoint))
        source_config = src_cfg.to_dict()
    model = build_model(spec, cfg, source).to(device)
    if cfg.channels_last and not spec.is_3d:  # faster convolutions on CUDA and with oneDNN on CPUs
        model = model.to(memory_format=torch.channels_last)
    return model, source_config


def make_ema(model: nn.Module, fraction: float, total_steps: int) -> AveragedModel:
    """An exponential moving average of ``model``'s weights and buffers (BatchNorm statistics too) over about
    ``fraction`` of the run's ``total_steps``: decay ``1 - 1 / (fraction * total_steps)``.

    Averaging the weights of the last stretch of steps smooths out where one noisy step left them, so the
    epoch-to-epoch validation numbers (and the choice among epochs) follow a trend rather than noise."""
    decay = 1 - 1 / max(1.0, fraction * total_steps)
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def _set_backbone_frozen(model: Classifier, frozen: bool) -> None:
    if isinstance(model.net, TransferNet):
        model.net.set_backbone_trainable(not frozen)


class Diverged(ValueError):
    """The loss or the model's outputs became NaN or infinite: nothing from here on would be worth keeping."""


def train_one_epoch(net: nn.Module, batches: Batches, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, loss_fn: nn.Module, augment: BatchAugment,
                    task: str, autocast: torch.autocast, desc: str = "",
                    progress_bar: bool = False, ema: AveragedModel | None = None) -> dict[str, float]:
    """One pass over ``batches`` (call ``batches.set_epoch`` first), stepping the scheduler (and updating the
    weight average ``ema``, if any) every batch.

    Returns this process's ``loss`` and ``acc`` (multi-label: the share of labels decided right, as MedMNIST's ACC
    counts them), averaged over its ``images``."""
    multi_label = task.startswith("multi-label")
    net.train()
    t0, seen, loss_sum, correct = time.perf_counter(), 0, 0.0, 0
    bar = tqdm(batches, desc=desc, disable=not progress_bar, leave=False)
    for images, labels in bar:
        with autocast:
            logits = net(images, augment if augment.active else None)
            loss = loss_fn(logits.float(), labels.float() if multi_label else labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(net)
        n, value = len(labels), loss.item()
        if not math.isfinite(value):
            raise Diverged(f"the training loss is {value} at step {seen // max(n, 1) + 1} of this epoch: training "
                           "diverged (lower --lr, or check the data); a run dir's checkpoint is never one that "
                           "diverged, and --overwrite starts the run again")
        seen += n
        loss_sum += value * n
        if multi_label:  # per image, the share of its labels decided right (logit > 0: probability > 0.5)
            correct += ((logits > 0) == labels.bool()).float().mean(1).sum().item()
        else:
            correct += (logits.argmax(1) == labels).sum().item()
        bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.4f}",
                        img_s=f"{seen / (time.perf_counter() - t0):.0f}")
    return {"loss": loss_sum / seen, "acc": correct / seen, "images": seen}


@torch.no_grad()
def validate(model: Classifier | Ensemble, split: Split, task: str, batch_size: int,
             device: torch.device) -> dict[str, float]:
    """Loss, headline metrics (``acc``, ``auc``, ``acc+auc``) and ``nll`` (after temperature scaling, as the
    model would be exported) of ``model`` on ``split``."""
    multi_label = task.startswith("multi-label")
    logits = predict_logits(model, split.images, batch_size, device)
    if not torch.isfinite(logits).all():  # the loss can stay finite while the last steps left NaN weights
        raise Diverged(f"the model's outputs on the {len(split.images)} validation images are not finite (NaN or "
                       "inf): training diverged (lower --lr, or check the data); --overwrite starts the run again")
    probs = probabilities(logits, multi_label)
    eps = 1e-7
    if multi_label:
        p = probs.clamp(eps, 1 - eps)
        y = split.labels.float()
        loss = -(y * p.log() + (1 - y) * (1 - p).log()).mean().item()
    else:
        loss = nn.functional.nll_loss(probs.clamp_min(eps).log(), split.labels).item()
    metrics = headline_metrics(task, probs, split.labels)
    temperature = fit_temperature(logits, split.labels, multi_label)
    nll = calibration_metrics(logits, split.labels, task, temperature)["nll"]
    return {"loss": loss, **metrics, "acc+auc": metrics["acc"] + metrics["auc"], "nll": nll}


def train(
    cfg: TrainConfig,
    run_dir: Path,
    data_dir: Path = DEFAULT_DATA_DIR,
    download: bool = True,
    resume: bool = False,
    device: str = "auto",
    quiet: bool = False,
    report: bool = True,
    stop_after: int | None = None,
) -> RunResult:
    """Train ``cfg`` into ``run_dir``; returns the test metrics of the best-on-val epoch.

    ``stop_after``: leave after this many epochs of this invocation (time-sliced or preemptible jobs);
    the checkpoint lets ``resume=True`` continue exactly where it stopped. Test metrics are then empty.
    ``cfg.ensemble`` > 1 trains that many members and averages them (see ``_train_ensemble``).
    """
    for member in (cfg.member(k) for k in range(cfg.ensemble)) if cfg.ensemble > 1 else (cfg,):
        _check_before_data(member, download)
    if cfg.ensemble > 1:
        return _train_ensemble(cfg, run_dir, data_dir, download, resume, device, quiet, report, stop_after)
    dev, rank, world = setup_distributed(device)
    is_main = rank == 0
    log = print if is_main else (lambda *a, **k: None)
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{torch.get_num_threads()} threads"
    log(f"[{cfg.name}] device: {dev} ({where})" + (f", {world} processes" if world > 1 else ""))

    ckpt_path = run_dir / CHECKPOINT
    checkpoint = read_checkpoint(ckpt_path) if resume and ckpt_path.exists() else None
    if checkpoint is not None:
        check_same_config(ckpt_path, checkpoint, cfg)
    spec = dataset_spec(cfg.dataset, cfg.size)
    train_split = load_split(spec, "train", data_dir, download).subset(cfg.train_limit)
    val_split = load_split(spec, "val", data_dir, download)
    log(f"[{cfg.name}] {spec.flag} ({spec.task}): train {len(train_split)}, val {len(val_split)}")
    if cfg.arch == "transfer" and cfg.backbone != CHECKPOINT_BACKBONE and \
            (side := cfg.input_size or TORCHVISION_INPUT_SIZE) < spec.size:  # said: it costs resolution
        log(f"[{cfg.name}] note: {spec.size} px images are resized to {side} px for the {cfg.backbone} backbone "
            f"(input_size); --set input_size={spec.size} keeps them, at about {(spec.size / side) ** 2:.0f}x the "
            "compute")

    torch.manual_seed(cfg.seed)
    model, source_config = build_classifier(cfg, spec, dev)
    optimizer = make_optimizer(cfg, model)
    batches = Batches(train_split, cfg.batch_size, shuffle=True, seed=cfg.seed, device=dev, rank=rank,
                      world_size=world, drop_last=True)
    if len(batches) == 0:  # every batch dropped as incomplete: the schedule would have no step at all
        per_process = f" shared by {world} processes" if world > 1 else ""
        raise ValueError(f"batch size {cfg.batch_size} is larger than the training split ({len(train_split)} "
                         f"images{' after train_limit' if cfg.train_limit else ''}{per_process}): lower "
                         "--batch-size")
    scheduler = make_scheduler(cfg, optimizer, len(batches))
    loss_fn = make_loss(spec.task, cfg.label_smoothing)
    augment = BatchAugment(cfg.augment)
    ema = make_ema(model, cfg.ema, cfg.epochs * len(batches)) if cfg.ema else None
    selected = ema.module if ema is not None else model  # what is validated, selected and exported

    run_dir.mkdir(parents=True, exist_ok=True)
    progress = Progress()
    if checkpoint is not None:
        progress = restore_training(checkpoint, model, optimizer, scheduler, dev, ema)
        log(f"[{cfg.name}] resumed from {ckpt_path} after epoch {progress.epochs_done}")
    elif is_main:
        _write_config(run_dir, cfg)

    net = torch.compile(model) if cfg.compile else model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda" and cfg.amp)

    start_epoch = progress.epochs_done
    for epoch in range(start_epoch, cfg.epochs):
        _set_backbone_frozen(model, cfg.freeze or epoch < cfg.head_epochs)
        batches.set_epoch(epoch)
        t0 = time.perf_counter()
        trained = train_one_epoch(net, batches, optimizer, scheduler, loss_fn, augment, spec.task, autocast,
                                  f"{cfg.name} {epoch + 1}/{cfg.epochs}", is_main and not quiet and sys.stderr.isatty(),
                                  ema)
        train_time = time.perf_counter() - t0
        val = validate(selected, val_split, spec.task, cfg.eval_batch_size, dev)
        row = {"epoch": epoch + 1, "train_loss": trained["loss"], "train_acc": trained["acc"],
               "val_loss": val["loss"], "val_acc": val["acc"], "val_auc": val["auc"], "val_nll": val["nll"],
               "lr": optimizer.param_groups[-1]["lr"], "img_per_s": trained["images"] * world / train_time,
               "epoch_s": time.perf_counter() - t0}
        improved = progress.record(row, val[cfg.select_metric], selected, cfg.select_lower_is_better)
        log(f"[{cfg.name}] epoch {epoch + 1}/{cfg.epochs} loss {row['train_loss']:.4f} "
            f"val acc {val['acc']:.4f} auc {val['auc']:.4f} nll {val['nll']:.4f} "
            f"({row['img_per_s']:.0f} img/s, {row['epoch_s']:.1f} s)"
            + (" *" if improved else ""))
        if is_main:
            save_checkpoint(training_state(cfg, source_config, model, optimizer, scheduler, progress, dev, ema),
                            ckpt_path)
        if cfg.patience and progress.stale_epochs >= cfg.patience:
            log(f"[{cfg.name}] early stop: val {cfg.select_metric} did not improve for {progress.stale_epochs} epochs")
            break
        if stop_after is not None and epoch + 1 - start_epoch >= stop_after and epoch + 1 < cfg.epochs:
            log(f"[{cfg.name}] stopping after epoch {epoch + 1} as asked; continue with --resume")
            return RunResult(run_dir, {}, epoch + 1, stopped=True)

    if world > 1:
        dist.barrier()
    if not is_main:
        return RunResult(run_dir, {}, progress.epochs_done)
    model.load_state_dict(progress.best_model)
    info = {"model": "pytorch (best val epoch, temperature-scaled)",
            "best_val": {cfg.select_metric: progress.best_metric}}
    metrics = evaluate_and_report(model, cfg, spec, run_dir, progress.history, info, data_dir, download, dev, report)
    return RunResult(run_dir, metrics, progress.epochs_done)


def _train_ensemble(cfg: TrainConfig, run_dir: Path, data_dir: Path, download: bool, resume: bool, device: str,
                    quiet: bool, report: bool, stop_after: int | None) -> RunResult:
    """Train ``cfg.ensemble`` members (``cfg.member(k)``: seeds ``cfg.seed``, +1, ..., each with its variant's
    overrides) into ``run_dir/member-K``, each selected on val on its own, and combine them into one
    ``Ensemble`` checkpoint in ``run_dir``.

    ``resume`` skips the members that finished and continues the one that did not; ``stop_after`` counts
    the epochs of this invocation across members."""
    epochs_left, last = stop_after, RunResult(run_dir, {}, 0)
    for k in range(cfg.ensemble):
        if epochs_left is not None and epochs_left <= 0:
            return RunResult(run_dir, {}, last.epochs_run, stopped=True)
        member = cfg.member(k)
        member_dir = run_dir / f"member-{k}"
        if resume and (member_dir / "metrics.json").exists():
            continue
        ckpt_path = member_dir / CHECKPOINT
        start = read_checkpoint(ckpt_path)["epoch"] + 1 if resume and ckpt_path.exists() else 0
        last = train(member, member_dir, data_dir, download, resume, device, quiet, report, epochs_left)
        if epochs_left is not None:
            epochs_left -= last.epochs_run - start
        if last.stopped:
            return RunResult(run_dir, {}, last.epochs_run, stopped=True)
    if int(os.environ.get("RANK", "0")) != 0:
        return RunResult(run_dir, {}, last.epochs_run)

    dev = resolve_device(device)
    spec = dataset_spec(cfg.dataset, cfg.size)
    done = [read_checkpoint(run_dir / f"member-{k}" / CHECKPOINT) for k in range(cfg.ensemble)]
    state = {"config": cfg.to_dict(), "epoch": max(c["epoch"] for c in done),
             "history": [{"member": k, **row} for k, c in enumerate(done) for row in c["history"]],
             "members": [{"config": c["config"], "backbone_source_config": c["backbone_source_config"],
                          "model": c["best_model"]} for c in done]}
    model = ensemble_from_checkpoint(state).to(dev)
    val = validate(model, load_split(spec, "val", data_dir, download), spec.task, cfg.eval_batch_size, dev)
    state["best_metric"] = val[cfg.select_metric]
    save_checkpoint(state, run_dir / CHECKPOINT)
    _write_config(run_dir, cfg)
    member_metrics = [json.loads((run_dir / f"member-{k}" / "metrics.json").read_text()) for k in range(cfg.ensemble)]
    info = {"model": f"ensemble of {cfg.ensemble} (mean probability, temperature-scaled)",
            "best_val": {cfg.select_metric: state["best_metric"]},
            "members": [{"seed": cfg.member(k).seed, "overrides": cfg.variant(k), "acc": m["acc"], "auc": m["auc"]}
                        for k, m in enumerate(member_metrics)]}
    metrics = evaluate_and_report(model, cfg, spec, run_dir, state["history"], info, data_dir, download, dev, report)
    return RunResult(run_dir, metrics, state["epoch"] + 1)


def check_same_config(ckpt_path: Path, checkpoint: dict[str, Any], cfg: TrainConfig) -> None:
    """Refuse to resume ``checkpoint`` under another config than its own (ValueError naming what differs): its
    weights, optimizer and schedule belong to that config (another task's weights were scored as this one's, or
    the schedule's step count broke when the epochs changed)."""
    saved = TrainConfig.from_dict(checkpoint["config"]).to_dict()
    wanted = cfg.to_dict()
    differ = [f"{key} {saved.get(key)!r} -> {wanted.get(key)!r}" for key in sorted(set(saved) | set(wanted))
              if saved.get(key) != wanted.get(key)]
    if differ:
        raise ValueError(f"--resume: {ckpt_path} was trained with another config ({'; '.join(differ)}): resume it "
                         "with its own options (its config.yaml), or train into another --run-dir")


def same_config(run_dir: Path, cfg: TrainConfig) -> bool:
    """Whether ``run_dir`` holds a run of this very config (fields added since then take their defaults)."""
    config = Path(run_dir) / "config.yaml"
    return config.exists() and TrainConfig.from_dict(yaml.safe_load(config.read_text())) == cfg


def evaluate_and_report(model: Classifier | Ensemble, cfg: TrainConfig, spec: DatasetSpec, run_dir: Path,
                        history: list[dict[str, float]], info: dict[str, Any], data_dir: Path, download: bool,
                        dev: torch.device, report: bool) -> dict[str, Any]:
    """Calibrate the selected model on the val split (temperature scaling, as the export does), evaluate it once
    on the test split; write history.csv, metrics.json and the report."""
    _write_history(run_dir / "history.csv", history)
    multi_label = spec.task.startswith("multi-label")
    val_split, test_split = (load_split(spec, s, data_dir, download) for s in ("val", "test"))
    val_logits, test_logits = (predict_logits(model, split.images, cfg.eval_batch_size, dev)
                               for split in (val_split, test_split))
    temperature = fit_temperature(val_logits, val_split.labels, multi_label)
    probs = probabilities(test_logits, multi_label, temperature)
    metrics = full_metrics(spec.task, probs, test_split.labels, list(spec.labels))
    calibration = calibration_report(temperature, spec.task, {"val": (val_logits, val_split.labels),
                                                              "test": (test_logits, test_split.labels)})
    metrics = {"dataset": spec.flag, "split": "test", "task": spec.task, **info, **metrics, "calibration": calibration}
    write_json_atomic(run_dir / "metrics.json", metrics)  # written last: marks the run finished
    print(f"[{cfg.name}] test acc {metrics['acc']:.4f} auc {metrics['auc']:.4f}, ECE "
          f"{calibration['test']['before']['ece']:.4f} -> {calibration['test']['after']['ece']:.4f} -> {run_dir}")
    if report:
        from training.report import write_report

        write_report(run_dir, model.cpu(), spec, history, test_split, probs, metrics,
                     probabilities(test_logits, multi_label))
    return metrics


def _write_config(run_dir: Path, cfg: TrainConfig) -> None:
    write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def _write_history(path: Path, history: list[dict[str, float]]) -> None:
    if not history:
        return
    with atomic_write(path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
