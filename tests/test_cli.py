"""``python -m training`` end to end on tiny generated data, as a user runs it."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from serving.model_card import read_card
from tests.conftest import EXPORTS, ROOT
from training.shipped import SHIPPED_NAMES


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "training", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


@pytest.mark.parametrize("command", ["train", "evaluate", "export", "calibrate", "quantize", "pipeline"])
def test_every_subcommand_explains_itself(command):
    out = run(command, "--help").stdout
    assert "--data-dir" in out and "usage: python -m training " + command in out


def test_shipped_lists_the_registry_without_importing_torch():
    # make models runs this with only the serve extra installed: importing any of these would fail there
    blocked = ["torch", "torchvision", "torchmetrics", "medmnist", "onnx", "numpy"]
    code = (f"import runpy, sys; sys.modules.update(dict.fromkeys({blocked})); sys.argv = ['training', 'shipped']; "
            "runpy.run_module('training', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == list(SHIPPED_NAMES) == ["mnist-cnn", "pneumoniamnist-cnn", "pneumoniamnist-transfer"]


def test_train_export_evaluate(fixture_data, tmp_path):
    data = ["--data-dir", str(fixture_data), "--no-download", "--quiet"]
    run("train", "retinamnist", "--epochs", "2", "--ensemble", "2", "--set", "widths=[8,16]",
        "--set", "augment.hflip=true", "--run-dir", str(tmp_path / "run"), "--export",
        "--model-dir", str(tmp_path / "repo"), *data)
    card = read_card(tmp_path / "repo" / "retinamnist-cnn" / "1" / "model.json")
    assert card.training["command"].startswith("python -m training train retinamnist")
    assert card.training["config"]["augment"]["hflip"] is True and card.training["epochs_run"] == 2
    assert card.training["config"]["ensemble"] == 2 and (tmp_path / "run" / "member-1" / "checkpoint.pt").exists()
    again = json.loads(run("evaluate", str(tmp_path / "repo" / "retinamnist-cnn" / "1"), *data[:-1]).stdout)
    assert again["acc"] == pytest.approx(card.metrics["test"]["acc"], abs=1e-9)
    from_checkpoint = json.loads(run("evaluate", str(tmp_path / "run" / "checkpoint.pt"), *data[:-1]).stdout)
    assert from_checkpoint["acc"] == pytest.approx(again["acc"], abs=1e-9)
    run("export", str(tmp_path / "run" / "checkpoint.pt"), "--name", "again", "--model-dir", str(tmp_path / "repo"),
        *data[:-1])
    assert (tmp_path / "repo" / "again" / "1" / "model.onnx").exists()
    twice = run("export", str(tmp_path / "run" / "checkpoint.pt"), "--name", "again", "--model-dir",
                str(tmp_path / "repo"), *data[:-1])
    assert "was exported already as again version(s) 1" in twice.stderr


def test_stop_after_then_resume(fixture_data, tmp_path):
    data = ["--data-dir", str(fixture_data), "--no-download", "--quiet", "--run-dir", str(tmp_path)]
    out = run("train", "pneumoniamnist", "--epochs", "3", "--set", "widths=[8,16]", "--stop-after", "1", *data)
    assert "continue with --resume" in out.stdout and not (tmp_path / "metrics.json").exists()
    out = run("train", "pneumoniamnist", "--epochs", "3", "--set", "widths=[8,16]", "--resume", *data)
    assert "resumed" in out.stdout and (tmp_path / "metrics.json").exists()


def test_pipeline_trains_and_publishes_the_three_models(fixture_data, tmp_path):
    run("pipeline", "--epochs", "1", "--set", "widths=[8,16]", "--data-dir", str(fixture_data), "--no-download",
        "--quiet", "--runs-dir", str(tmp_path / "runs"), "--model-dir", str(tmp_path / "repo"), timeout=600)
    for name in SHIPPED_NAMES:
        card = read_card(tmp_path / "repo" / name / "1" / "model.json")
        assert card.name == name
        assert (card.quantization is not None) == (name == "mnist-cnn")  # served int8, as exports/ ships it
    transfer = read_card(tmp_path / "repo" / "pneumoniamnist-transfer" / "1" / "model.json")
    assert "mnist-cnn" in transfer.training["notes"] and transfer.training["config"]["backbone"] == "checkpoint"
    # its weights came from that file, not from ImageNet, and the card names the file wherever it is read
    assert transfer.training["config"]["pretrained"] is False
    assert os.path.isabs(transfer.training["config"]["backbone_checkpoint"])


def refused(*args: str) -> str:
    """Run a command that must fail with one clear line; -> that line."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "training", *args], env=env, capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert done.returncode == 2 and done.stderr.startswith("error: "), done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    return done.stderr


def test_a_diverged_run_a_run_dir_in_use_and_an_unwritable_repository_are_one_clear_error(fixture_data, tmp_path):
    data = ("--data-dir", str(fixture_data), "--no-download", "--quiet")
    # an outside probe: a run that blew up to NaN exited 0 and published a model whose probabilities were all NaN
    error = refused("train", "pneumoniamnist", "--epochs", "1", "--lr", "1e30", "--set", "optimizer=sgd", "--set",
                    "schedule=constant", "--set", "widths=[8,16]", "--run-dir", str(tmp_path / "diverged"), "--export",
                    "--model-dir", str(tmp_path / "repo"), *data)
    assert "training diverged (lower --lr" in error  # stopped in training, not only by the export's check
    assert not (tmp_path / "repo").exists()
    # a second train into a finished run's dir replaced its checkpoint without a word; an ensemble's members too
    used = tmp_path / "used"
    (used / "member-1").mkdir(parents=True)
    (used / "member-1" / "checkpoint.pt").write_bytes(b"a member")
    assert "holds a training run already (member-1/checkpoint.pt)" in refused("train", "pneumoniamnist",
                                                                              "--run-dir", str(used), *data)
    (used / "checkpoint.pt").write_bytes(b"a run")
    assert "holds a training run already (checkpoint.pt)" in refused("train", "pneumoniamnist", "--run-dir",
                                                                     str(used), *data)
    run("train", "pneumoniamnist", "--epochs", "1", "--set", "widths=[8,16]", "--run-dir", str(used), "--overwrite",
        *data)  # the old run's checkpoints and metrics go first: a resume would have picked them up
    assert (used / "checkpoint.pt").read_bytes() != b"a run" and not (used / "member-1").exists()
    # a repository that cannot be written failed after the whole training: now before the data is even looked for
    (tmp_path / "a-file").write_text("")
    assert "is a file, not a directory" in refused("train", "pneumoniamnist", "--run-dir", str(tmp_path / "new"),
                                                   "--export", "--model-dir", str(tmp_path / "a-file" / "repo"),
                                                   "--data-dir", str(tmp_path / "no-data"), "--no-download")


def test_a_reader_that_goes_away_is_not_an_error():
    # `python -m training datasets | head -1`: the pipe is closed before the command writes
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.Popen([sys.executable, "-m", "training", "datasets"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    done.stdout.close()
    stderr = done.stderr.read().decode()
    assert done.wait(120) == 0 and "BrokenPipeError" not in stderr, stderr[-2000:]


def test_missing_data_offline_is_one_clear_error(tmp_path):
    assert "pneumoniamnist.npz not found" in refused("train", "pneumoniamnist", "--data-dir", str(tmp_path),
                                                     "--no-download")


def test_backbones_and_evaluations_that_cannot_work_are_one_clear_error(tmp_path, monkeypatch):
    # each was a traceback (or, for evaluate, metrics of nonsense) before the data or the model was even used
    data = ("--data-dir", str(tmp_path), "--no-download")
    export = EXPORTS / "mnist-cnn" / "1"
    assert "is a directory, not a checkpoint" in refused("train", "pneumoniamnist-transfer", "--backbone-checkpoint",
                                                         str(export), *data)
    assert "is an ONNX export, not a checkpoint" in refused("train", "pneumoniamnist-transfer",
                                                            "--backbone-checkpoint", str(export / "model.onnx"), *data)
    (tmp_path / "model.pt").write_bytes((export / "model.onnx").read_bytes()[:4096])  # no file torch.save wrote
    assert "is not a PyTorch checkpoint" in refused("train", "pneumoniamnist-transfer", "--backbone-checkpoint",
                                                    str(tmp_path / "model.pt"), *data)
    state_dict = tmp_path / "weights.pt"
    torch.save({"conv.weight": torch.zeros(1)}, state_dict)
    assert "for transfer models" in refused("train", "pneumoniamnist", "--backbone-checkpoint", str(state_dict), *data)
    # a state dict of another architecture: said before the (here missing) data is looked for
    assert "is not a resnet18 state dict" in refused("train", "pneumoniamnist-transfer", "--backbone-checkpoint",
                                                     str(state_dict), *data)
    assert "add --export" in refused("train", "pneumoniamnist", "--model-dir", str(tmp_path / "repo"), *data)
    assert "under their names: --set size" in refused("pipeline", "--set", "size=64", *data)
    assert "cannot be scored on chestmnist" in refused("evaluate", str(export), "--dataset", "chestmnist", *data)
    # an outside probe's: offline, ImageNet weights were fetched anyway (a 40-frame traceback after the data had
    # loaded), and a checkpoint backbone without its file failed after the data too
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert "ImageNet weights are not cached and downloads are off" in refused("train", "pneumoniamnist", "--set",
                                                                             "arch=transfer", *data)
    assert "needs --backbone-checkpoint PATH" in refused("train", "pneumoniamnist", "--set", "arch=transfer", "--set",
                                                         "backbone=checkpoint", *data)
    assert "labels name sides" in refused("train", "organmnist3d", "--set", "augment.hflip=true", *data)
    assert "'freeze' is true, but arch is 'cnn'" in refused("train", "pneumoniamnist", "--freeze", *data)


def test_calibrate_publishes_a_calibrated_next_version(fixture_data, tmp_path):
    model = tmp_path / "repo" / "pneumoniamnist-cnn"
    shutil.copytree(EXPORTS / "pneumoniamnist-cnn" / "1", model / "1")
    data = ["--data-dir", str(fixture_data), "--no-download"]
    out = run("calibrate", str(model / "1"), "--report-dir", str(tmp_path / "report"), *data)
    assert "exported" in out.stdout and (tmp_path / "report" / "reliability_diagram.png").exists()
    card = read_card(model / "2" / "model.json")
    assert card.training["command"].startswith("python -m training calibrate ") and card.calibration["temperature"]


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_a_stop_signal_mid_export_leaves_nothing_half_written(tmp_path, monkeypatch, capsys, signum):
    # an outside probe: SIGTERM (what Kubernetes sends a Job's pod) during export left .staging-* directories in
    # the model repository; Ctrl-C cleaned up but printed a traceback
    import signal
    import time

    from training import cli, export

    def run(args):
        with export._staging(tmp_path / "model"):
            os.kill(os.getpid(), getattr(signal, signum))
            time.sleep(5)  # the signal arrives before this ends

    monkeypatch.setattr(cli, "run", run)
    assert cli.main(["datasets"]) == 128 + getattr(signal, signum)
    assert not (tmp_path / "model").exists()  # neither the staging folder nor the model folder it made
    assert f"stopped by {signum}" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is not cli._stop  # the handler is the process's again


def test_a_command_ends_the_process_group_it_ran_in(monkeypatch, capsys):
    # a torchrun rank that exited with gloo's threads alive aborted once in CI (SIGABRT), and torchrun stopped the
    # other rank: every command now destroys the group on its way out
    import socket

    import torch.distributed as dist

    from training.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        assert main(["shipped"]) == 0
        left_alive = dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert not left_alive
