"""Training loop behaviour on tiny generated data, and a short real MNIST run when the data is present."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT
from training.checkpoint import Progress, load_model, read_checkpoint
from training.config import TrainConfig
from training.data import dataset_spec, load_split
from training.evaluate import predict_torch
from training.train import CHECKPOINT, make_loss, train


def tiny(dataset: str, **overrides) -> TrainConfig:
    base = dict(name=f"tiny-{dataset}", dataset=dataset, widths=[8, 16], epochs=3, batch_size=16, lr=0.01,
                augment={"translate": 0.1, "rotate": 10}, eval_batch_size=64)
    return TrainConfig.from_dict({**base, **overrides})


@pytest.mark.parametrize("flag", ["pneumoniamnist", "retinamnist", "chestmnist", "organmnist3d"])
def test_every_task_type_trains_and_writes_a_report(fixture_data, tmp_path, flag):
    result = train(tiny(flag, epochs=1), tmp_path, fixture_data, download=False, quiet=True)
    for name in ("metrics.json", "history.csv", "learning_curves.png", "confusion_matrix.png", "roc_curves.png",
                 "misclassified.png", "model_summary.txt", "reliability_diagram.png", CHECKPOINT, "config.yaml"):
        assert (tmp_path / name).exists(), name
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert 0 <= metrics["acc"] <= 1 and 0 <= metrics["auc"] <= 1
    n_temperatures = len(metrics["per_class"]) if flag == "chestmnist" else 1
    assert len(metrics["calibration"]["temperature"]) == n_temperatures
    assert set(metrics["calibration"]["test"]["after"]) == {"ece", "nll", "brier"}
    assert metrics == json.loads(json.dumps(result.metrics))
    rows = (tmp_path / "history.csv").read_text().splitlines()
    train_acc = [float(v) for v in [row.split(",")[rows[0].split(",").index("train_acc")] for row in rows[1:]]]
    assert train_acc and all(0 < a <= 1 for a in train_acc)  # multi-label: was 0, plotted flat beside val acc


def test_label_smoothing_applies_to_multi_label_losses_as_to_two_classes():
    """A multi-label card said label_smoothing 0.1 while its loss was plain BCE (an outside probe)."""
    logits, targets = torch.tensor([[3.0, -2.0, 0.5]]), torch.tensor([[1.0, 0.0, 1.0]])
    plain = torch.nn.functional.binary_cross_entropy_with_logits
    task = "multi-label, binary-class"
    assert torch.isclose(make_loss(task, 0.0)(logits, targets), plain(logits, targets))
    smoothed = torch.tensor([[0.95, 0.05, 0.95]])  # 1 -> 1 - 0.1/2, 0 -> 0.1/2
    assert torch.isclose(make_loss(task, 0.1)(logits, targets), plain(logits, smoothed))
    # as two-class cross-entropy smooths a binary label: the same targets, so the same optimum
    two_class = torch.nn.CrossEntropyLoss(label_smoothing=0.1)(torch.tensor([[0.0, 3.0]]), torch.tensor([1]))
    assert torch.isclose(two_class, plain(torch.tensor([3.0]), torch.tensor([0.95])))


@pytest.mark.parametrize("selection", [{}, {"ema": 0.3, "select": "nll"}], ids=["plain", "ema-nll"])
def test_resume_after_a_kill_ends_exactly_like_an_uninterrupted_run(fixture_data, tmp_path, selection):
    cfg = tiny("pneumoniamnist", **selection)
    straight = train(cfg, tmp_path / "a", fixture_data, download=False, quiet=True, report=False)
    partial = train(cfg, tmp_path / "b", fixture_data, download=False, quiet=True, report=False, stop_after=2)
    assert partial.epochs_run == 2 and partial.metrics == {}
    assert read_checkpoint(tmp_path / "b" / CHECKPOINT)["epoch"] == 1  # 0-based: two epochs done
    resumed = train(cfg, tmp_path / "b", fixture_data, download=False, resume=True, quiet=True, report=False)
    assert resumed.epochs_run == 3
    assert resumed.metrics["acc"] == straight.metrics["acc"]
    assert resumed.metrics["auc"] == straight.metrics["auc"]
    a, b = read_checkpoint(tmp_path / "a" / CHECKPOINT), read_checkpoint(tmp_path / "b" / CHECKPOINT)
    assert a["history"][-1]["val_loss"] == b["history"][-1]["val_loss"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_resume_refuses_a_checkpoint_of_another_config(fixture_data, tmp_path):
    # an outside probe: another task's run resumed silently (its weights scored as this task's, rc 0), and more
    # epochs broke the restored schedule's step count with a bare torch error
    train(tiny("pneumoniamnist", epochs=1), tmp_path, fixture_data, download=False, quiet=True, report=False)
    for other, named in ((tiny("breastmnist", epochs=1), "dataset 'pneumoniamnist' -> 'breastmnist'"),
                         (tiny("pneumoniamnist", epochs=2), "epochs 1 -> 2")):
        with pytest.raises(ValueError, match=r"--resume: .* was trained with another config") as refused:
            train(other, tmp_path, fixture_data, download=False, resume=True, quiet=True, report=False)
        assert named in str(refused.value)


def test_nll_selection_keeps_the_epoch_with_the_lowest_value():
    progress, model = Progress(), torch.nn.Linear(1, 1)
    chosen = [progress.record({}, nll, model, lower_is_better=True) for nll in (0.5, 0.3, 0.4)]
    assert chosen == [True, True, False] and progress.best_metric == 0.3 and progress.stale_epochs == 1


def test_the_weight_average_is_what_is_validated_and_selected(fixture_data, tmp_path):
    train(tiny("pneumoniamnist", epochs=1, ema=0.5, select="nll"), tmp_path, fixture_data, download=False,
          quiet=True, report=False)
    ckpt = read_checkpoint(tmp_path / CHECKPOINT)
    averaged = {k.removeprefix("module."): v for k, v in ckpt["ema"].items() if k.startswith("module.")}
    assert averaged.keys() == ckpt["best_model"].keys() == ckpt["model"].keys()
    assert all(torch.equal(ckpt["best_model"][k], averaged[k]) for k in averaged)
    assert not all(torch.equal(ckpt["model"][k], averaged[k]) for k in averaged)  # not the last step's weights
    assert int(ckpt["ema"]["n_averaged"]) == 96 // 16  # updated after every step (96 images, batches of 16)
    assert ckpt["best_metric"] == ckpt["history"][0]["val_nll"] > 0


def test_an_ensemble_averages_its_members_and_resumes_across_them(fixture_data, tmp_path):
    cfg = tiny("retinamnist", epochs=2, ensemble=2, seed=5, ensemble_variants=[{}, {"highpass": 1.0}])
    straight = train(cfg, tmp_path / "a", fixture_data, download=False, quiet=True)
    assert [(m["seed"], m["overrides"]) for m in straight.metrics["members"]] == [(5, {}), (6, {"highpass": 1.0})]
    for name in ("metrics.json", "history.csv", "learning_curves.png", "roc_curves.png", "member-1/metrics.json"):
        assert (tmp_path / "a" / name).exists(), name
    ensemble, _, _ = load_model(tmp_path / "a" / CHECKPOINT)
    images = load_split(dataset_spec("retinamnist"), "test", fixture_data, download=False).images
    members = [load_model(tmp_path / "a" / f"member-{k}" / CHECKPOINT)[0] for k in range(2)]
    assert [m.preprocess.highpass for m in ensemble.members] == [m.preprocess.highpass for m in members] == [None, 1.0]
    expected = (predict_torch(members[0], images, False) + predict_torch(members[1], images, False)) / 2
    torch.testing.assert_close(predict_torch(ensemble, images, False), expected, atol=1e-6, rtol=0)

    # killed twice (after 1 epoch, then 2 more: into the second member), then resumed to the end
    partial = train(cfg, tmp_path / "b", fixture_data, download=False, quiet=True, report=False, stop_after=1)
    assert partial.stopped and partial.epochs_run == 1 and not (tmp_path / "b" / CHECKPOINT).exists()
    partial = train(cfg, tmp_path / "b", fixture_data, download=False, resume=True, quiet=True, report=False,
                    stop_after=2)
    assert partial.stopped and read_checkpoint(tmp_path / "b" / "member-1" / CHECKPOINT)["epoch"] == 0
    resumed = train(cfg, tmp_path / "b", fixture_data, download=False, resume=True, quiet=True, report=False)
    assert not resumed.stopped
    assert (resumed.metrics["acc"], resumed.metrics["auc"]) == (straight.metrics["acc"], straight.metrics["auc"])


def test_ensemble_variants_are_checked_when_the_config_is_read():
    cfg = tiny("retinamnist", ensemble=3, ensemble_variants=[{"highpass": 1.5}, {"augment.hflip": True}])
    assert [(m.seed, m.highpass, m.augment.hflip, m.augment.translate) for m in map(cfg.member, range(3))] == [
        (0, 1.5, False, 0.1), (1, None, True, 0.1), (2, 1.5, False, 0.1)]
    with pytest.raises(ValueError, match="unknown config keys: \\['hihgpass'\\]"):
        tiny("retinamnist", ensemble=2, ensemble_variants=[{"hihgpass": 1.5}])
    with pytest.raises(ValueError, match="may not set \\['seed'\\]"):
        tiny("retinamnist", ensemble=2, ensemble_variants=[{"seed": 3}])
    with pytest.raises(ValueError, match="needs ensemble"):
        tiny("retinamnist", ensemble_variants=[{}, {"highpass": 1.5}])


def test_early_stopping_and_staged_transfer_from_our_own_checkpoint(fixture_data, tmp_path):
    source = train(tiny("mnist", epochs=1), tmp_path / "mnist", fixture_data, download=False, quiet=True, report=False)
    cfg = tiny("pneumoniamnist", arch="transfer", backbone="checkpoint", epochs=8, head_epochs=1, patience=1,
               lr=0.0, backbone_checkpoint=str(source.run_dir / CHECKPOINT))
    result = train(cfg, tmp_path / "transfer", fixture_data, download=False, quiet=True, report=False)
    # lr 0: only BatchNorm statistics move, so val AUC soon stops improving; patience 1 stops at the first miss
    history = read_checkpoint(tmp_path / "transfer" / CHECKPOINT)["history"]
    aucs = [h["val_auc"] for h in history]
    first_miss = next(i for i in range(1, len(aucs)) if aucs[i] <= max(aucs[:i]))
    assert result.epochs_run == first_miss + 1 < 8
    model, loaded_cfg, ckpt = load_model(tmp_path / "transfer" / CHECKPOINT)
    assert loaded_cfg.arch == "transfer" and ckpt["backbone_source_config"]["dataset"] == "mnist"
    assert model(torch.zeros(2, 28, 28, dtype=torch.uint8)).shape == (2, 2)


def test_ddp_with_two_cpu_processes_trains_an_ensemble(fixture_data, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "training",
           "train", "pneumoniamnist", "--set", "widths=[8,16]", "--epochs", "2", "--batch-size", "16", "--quiet",
           "--ensemble", "2", "--data-dir", str(fixture_data), "--no-download", "--run-dir", str(tmp_path),
           "--device", "cpu"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("2 processes") == 2  # one line per member, from rank 0
    for k in range(2):  # each member trained by both processes: header + 2 epochs
        assert len((tmp_path / f"member-{k}" / "history.csv").read_text().splitlines()) == 3
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["n"] == 48 and [m["seed"] for m in metrics["members"]] == [0, 1]
    assert len(load_model(tmp_path / CHECKPOINT)[0].members) == 2


@pytest.mark.slow
def test_short_real_mnist_training_reaches_97_percent(real_data, tmp_path):
    cfg = TrainConfig.load("mnist", {"epochs": 1, "train_limit": 12000, "widths": [16, 32, 64]})
    result = train(cfg, tmp_path, real_data, download=False, quiet=True, report=False)
    assert result.metrics["acc"] >= 0.97, result.metrics["acc"]


def test_a_batch_larger_than_the_training_split_is_a_clear_error(fixture_data, tmp_path):
    # an outside probe: torch's "Expected positive integer total_steps, but got 0" (one-cycle) or a
    # ZeroDivisionError (cosine, constant), after the run dir was started
    for schedule in ("onecycle", "cosine"):
        with pytest.raises(ValueError, match="batch size 512 is larger than the training split"):
            train(tiny("pneumoniamnist", batch_size=512, schedule=schedule), tmp_path, fixture_data, download=False,
                  quiet=True, report=False)


@pytest.mark.parametrize("steps", range(1, 12))
def test_the_one_cycle_schedule_runs_any_number_of_steps(steps):
    # an outside probe: exactly 5 optimiser steps (train_limit=320 at batch 64) was a ZeroDivisionError in PyTorch's
    # OneCycleLR, whose warm-up then ended at step 0
    from training.train import make_scheduler

    cfg = TrainConfig.from_dict({"name": "t", "dataset": "pneumoniamnist", "epochs": 1})
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    scheduler = make_scheduler(cfg, optimizer, steps)
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
    assert all(group["lr"] >= 0 for group in optimizer.param_groups)
