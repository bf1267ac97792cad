"""Export contract: raw uint8 in, probs out, parity with PyTorch, true cards, atomic never-overwriting versions."""

import json
import os
import shutil
import stat

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from serving.model_card import file_sha256, read_card
from tests.conftest import EXPORTS
from tests.test_train import tiny
from training.calibration import calibration_report, probabilities
from training.checkpoint import load_model
from training.config import TRANSFER_ONLY, TrainConfig
from training.data import dataset_spec, load_split
from training.evaluate import evaluate_path, predict_onnx
from training.export import (
    ExportError,
    border_grey_level,
    check_parity,
    export_checkpoint,
    quantize_version,
    strokes_share,
)
from training.recipes import derive_config
from training.train import CHECKPOINT, train

# every task type, 2D and 3D, grey and RGB
SHAPES = {"pneumoniamnist": [28, 28], "retinamnist": [28, 28, 3], "chestmnist": [28, 28], "pathmnist": [28, 28, 3],
          "organmnist3d": [28, 28, 28], "adrenalmnist3d": [28, 28, 28]}


@pytest.fixture(scope="module")
def trained(fixture_data, tmp_path_factory):
    """Each flag's config derived from its metadata (as ``train FLAG`` does without a YAML), shrunk to run in
    seconds, trained for one epoch on generated files in the real format."""
    runs = tmp_path_factory.mktemp("runs")
    out = {}
    for flag in SHAPES:
        extra = {"highpass": 1.5} if flag == "retinamnist" else {}  # the Gaussian blur must export too
        cfg = TrainConfig.from_dict({**derive_config(flag).to_dict(), "widths": [8, 16], "epochs": 1,
                                     "batch_size": 16, "eval_batch_size": 64, **extra})
        train(cfg, runs / flag, fixture_data, download=False, quiet=True, report=False)
        out[flag] = runs / flag / CHECKPOINT
    return out


@pytest.mark.parametrize("flag,shape", SHAPES.items())
def test_export_writes_onnx_and_a_true_card(trained, fixture_data, tmp_path, flag, shape):
    path = export_checkpoint(trained[flag], tmp_path, data_dir=fixture_data, download=False, command="pytest")
    assert path == tmp_path / f"{flag}-cnn" / "1"
    card = read_card(path / "model.json")
    assert card.input.shape == shape and card.sha256 == file_sha256(path / "model.onnx")
    assert card.training["command"] == "pytest" and card.dataset["splits"]["test"] == 48
    train_images = load_split(dataset_spec(flag), "train", fixture_data, download=False).images.numpy()
    assert card.input_background == border_grey_level(train_images)
    assert card.input_strokes_share == strokes_share(train_images, card.input_background)  # None unless plain
    assert not set(TRANSFER_ONLY) & set(card.training["config"])  # a CNN's card read "resnet18, pretrained: true"
    session = ort.InferenceSession(str(path / "model.onnx"))
    (inp,) = session.get_inputs()
    assert inp.name == "images" and inp.type == "tensor(uint8)" and inp.shape[1:] == shape
    x = np.random.default_rng(0).integers(0, 256, size=(5, *shape), dtype=np.uint8)
    probs, logits = session.run(["probs", "logits"], {"images": x})
    assert probs.shape == (5, len(card.labels)) and probs.dtype == np.float32
    # probs are calibrated: the logits divided by the card's temperature(s), then sigmoid / softmax
    temperature = torch.tensor(card.calibration["temperature"])
    assert len(temperature) == (len(card.labels) if flag == "chestmnist" else 1)
    np.testing.assert_allclose(probs, probabilities(torch.from_numpy(logits), card.multi_label, temperature).numpy(),
                               atol=1e-6)
    assert set(card.calibration["val"]["after"]) == {"ece", "nll", "brier"} and card.calibration["test"]["n"] == 48
    props = {p.key: p.value for p in onnx.load(str(path / "model.onnx")).metadata_props}
    assert props["cnnserve.name"] == f"{flag}-cnn" and json.loads(props["cnnserve.labels"]) == card.labels
    # the card's test metrics are what the exported model scores
    again = evaluate_path(path, "test", data_dir=fixture_data, download=False)
    assert again["acc"] == pytest.approx(card.metrics["test"]["acc"], abs=1e-9)


@pytest.mark.parametrize("flag", ["pneumoniamnist", "chestmnist"])
def test_int8_export_keeps_the_classifier_and_the_probabilities_in_float(trained, fixture_data, tmp_path, flag):
    # quantised, the head put the probabilities on a uint8 grid: rows summing to 254/255, a handful of values
    path = export_checkpoint(trained[flag], tmp_path, data_dir=fixture_data, download=False, command="pytest",
                             quantize="int8")
    model = onnx.load(str(path / "model.onnx"))
    quantized_inputs = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    weighted = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    assert any(set(n.input) & quantized_inputs for n in weighted), "nothing was quantised"
    producers = {out: n for n in model.graph.node for out in n.output}
    assert producers["logits"].op_type in ("Gemm", "MatMul") and not set(producers["logits"].input) & quantized_inputs
    x = np.random.default_rng(0).integers(0, 256, size=(32, 28, 28), dtype=np.uint8)
    probs = ort.InferenceSession(str(path / "model.onnx")).run(["probs"], {"images": x})[0]
    assert len(np.unique(probs[:, 0])) >= 30
    if flag == "pneumoniamnist":
        np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-5)


def test_versions_increase_and_are_never_overwritten(trained, fixture_data, tmp_path):
    first = export_checkpoint(trained["retinamnist"], tmp_path, name="m", data_dir=fixture_data, download=False,
                              command="first")
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    second = export_checkpoint(trained["retinamnist"], tmp_path, name="m", data_dir=fixture_data, download=False,
                               command="second")
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before  # version 1 untouched, file by file
    assert read_card(first / "model.json").training["command"] == "first"
    assert read_card(first / "model.json").sha256 == file_sha256(first / "model.onnx")
    assert read_card(second / "model.json").training["command"] == "second"
    assert (first.name, second.name) == ("1", "2")
    assert not [p for p in (tmp_path / "m").iterdir() if p.name.startswith(".")]  # no staging left behind


def test_a_published_version_is_readable_by_other_users(trained, fixture_data, tmp_path):
    # a server running as another user than the training job must be able to list and read it
    umask = os.umask(0o022)
    try:
        path = export_checkpoint(trained["pneumoniamnist"], tmp_path, data_dir=fixture_data, download=False)
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in path.iterdir()} == {0o644}


def test_parity_failure_is_loud(trained, fixture_data, tmp_path):
    model, _, _ = load_model(trained["retinamnist"])
    path = export_checkpoint(trained["retinamnist"], tmp_path, data_dir=fixture_data, download=False)
    with torch.no_grad():
        model.net.head[1].bias[0] += 5.0  # PyTorch now differs from the exported graph
    x = torch.randint(0, 256, (16, 28, 28, 3), dtype=torch.uint8)
    with pytest.raises(ExportError, match="parity check failed"):
        check_parity(model, path / "model.onnx", x, multi_label=False)


def test_a_failed_first_export_leaves_no_model_folder_and_a_later_one_keeps_its_versions(
        trained, fixture_data, tmp_path, monkeypatch):
    """An outside probe: an export that failed left an empty <model>/ in the repository."""
    import training.export

    def failing(*args, **kwargs):
        raise ExportError("parity check failed (made to)")

    monkeypatch.setattr(training.export, "check_parity", failing)
    with pytest.raises(ExportError):
        export_checkpoint(trained["retinamnist"], tmp_path, data_dir=fixture_data, download=False)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    first = export_checkpoint(trained["retinamnist"], tmp_path, data_dir=fixture_data, download=False)
    monkeypatch.setattr(training.export, "check_parity", failing)
    with pytest.raises(ExportError):
        export_checkpoint(trained["retinamnist"], tmp_path, data_dir=fixture_data, download=False)
    assert sorted(p.name for p in first.parent.iterdir()) == ["1"]


def test_int8_quantization_reports_its_effect(trained, fixture_data, tmp_path):
    path = export_checkpoint(trained["retinamnist"], tmp_path, data_dir=fixture_data, download=False,
                             quantize="int8")
    card = read_card(path / "model.json")
    q = card.quantization
    assert q is not None and {"fp32_test", "int8_test", "acc_change", "auc_change", "speedup_batch1_cpu",
                              "speedup_batch64_cpu"} <= set(q)
    assert "96 calibration images" in q["method"]  # the fixture's whole train split (under the 512 cap)
    assert 0.5 < q["test_decisions_same_as_fp32"] <= 1 and 0 < q["test_max_abs_prob_diff"] < 1
    assert card.metrics["test"]["acc"] == q["int8_test"]["acc"]
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(path / "model.onnx")).graph.node)


def test_int8_quantization_survives_a_failing_pre_process(trained, fixture_data, tmp_path, monkeypatch, capsys):
    # onnxruntime 1.30's symbolic shape inference asserts on graphs torch 2.11 exports (seen on the GPU check)
    from onnxruntime.quantization import shape_inference

    def broken(*args, **kwargs):
        raise AssertionError

    monkeypatch.setattr(shape_inference, "quant_pre_process", broken)
    path = export_checkpoint(trained["retinamnist"], tmp_path, data_dir=fixture_data, download=False,
                             quantize="int8")
    assert "quant_pre_process failed" in capsys.readouterr().out
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(path / "model.onnx")).graph.node)
    assert not list(path.glob("*.prep.onnx"))


def test_a_multi_label_ensemble_exports_the_mean_of_its_members(fixture_data, tmp_path):
    cfg = tiny("chestmnist", epochs=1, ensemble=2)
    train(cfg, tmp_path / "run", fixture_data, download=False, quiet=True, report=False)
    path = export_checkpoint(tmp_path / "run" / CHECKPOINT, tmp_path / "repo", data_dir=fixture_data, download=False)
    card = read_card(path / "model.json")
    assert card.training["config"]["ensemble"] == 2 and card.metrics["parity"]["labels_identical"]
    x = np.random.default_rng(1).integers(0, 256, size=(6, 28, 28), dtype=np.uint8)
    probs, logits = ort.InferenceSession(str(path / "model.onnx")).run(["probs", "logits"], {"images": x})
    members = [load_model(tmp_path / "run" / f"member-{k}" / CHECKPOINT)[0] for k in range(2)]
    with torch.no_grad():
        expected = torch.stack([torch.sigmoid(m(torch.from_numpy(x))) for m in members]).mean(0)
    np.testing.assert_allclose(torch.sigmoid(torch.from_numpy(logits)).numpy(), expected.numpy(), atol=1e-5)
    # one temperature per label, on the ensemble's mean (not on each member)
    temperature = torch.tensor(card.calibration["temperature"])
    np.testing.assert_allclose(probs, torch.sigmoid(torch.logit(expected) / temperature).numpy(), atol=1e-5)


def test_quantize_publishes_an_int8_next_version_that_keeps_the_calibration(fixture_data, tmp_path):
    source = tmp_path / "mnist-cnn" / "2"
    shutil.copytree(EXPORTS / "mnist-cnn" / "2", source)
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    path = quantize_version(source, fixture_data, download=False, command="python -m training quantize x")
    assert path == tmp_path / "mnist-cnn" / "3"
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before
    card, old = read_card(path / "model.json"), read_card(source / "model.json")
    assert card.sha256 == file_sha256(path / "model.onnx") and card.training["command"].endswith("quantize x")
    assert card.training["quantized_from"]["sha256"] == old.sha256
    assert card.training["calibrated_from"] == old.training["calibrated_from"]  # the lineage is kept
    assert set(card.metrics) == {"test"}  # the source's parity with PyTorch describes the float network
    again = evaluate_path(path, "test", data_dir=fixture_data, download=False)
    assert again["acc"] == pytest.approx(card.metrics["test"]["acc"], abs=1e-9)
    float_acc = evaluate_path(source, "test", data_dir=fixture_data, download=False)["acc"]  # the same split
    assert card.quantization["fp32_test"]["acc"] == pytest.approx(float_acc, abs=1e-9)
    assert card.quantization["fp32_test"]["n"] == card.metrics["test"]["n"]
    # the source's temperature, its calibration measured on this file's logits
    temperature = torch.tensor(old.calibration["temperature"])
    assert card.calibration["temperature"] == old.calibration["temperature"]
    spec = dataset_spec("mnist", 28)
    splits = {name: (torch.from_numpy(predict_onnx(path / "model.onnx", split.images.numpy(), output="logits")),
                     split.labels)
              for name, split in ((n, load_split(spec, n, fixture_data, False)) for n in ("val", "test"))}
    expected = calibration_report(temperature, card.task, splits)
    assert (card.calibration["val"], card.calibration["test"]) == (expected["val"], expected["test"])
    images = np.random.default_rng(0).integers(0, 256, size=(16, 28, 28), dtype=np.uint8)
    session = ort.InferenceSession(str(path / "model.onnx"))
    probs, logits = session.run(["probs", "logits"], {"images": images})
    np.testing.assert_allclose(probs, torch.softmax(torch.from_numpy(logits) / card.calibration["temperature"][0],
                                                    1).numpy(), atol=1e-5)
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(path / "model.onnx")).graph.node)
    with pytest.raises(ValueError, match="quantised already"):
        quantize_version(path, fixture_data, download=False)


def test_quantize_does_not_publish_an_int8_network_slower_than_its_source(fixture_data, tmp_path, monkeypatch):
    # an outside probe: a 3D model's int8 version measured 0.75x at batch 64 was published, and became the default
    import training.export

    source = tmp_path / "mnist-cnn" / "2"
    shutil.copytree(EXPORTS / "mnist-cnn" / "2", source)
    monkeypatch.setattr(training.export, "ort_images_per_second",
                        lambda path, images, batch, repeats: 500.0 if "int8" in str(path) else 1000.0)
    with pytest.raises(ValueError, match="ran slower than version 2"):
        quantize_version(source, fixture_data, download=False)
    assert sorted(p.name for p in source.parent.iterdir()) == ["2"]  # nothing published, nothing half-written
    path = quantize_version(source, fixture_data, download=False, allow_slower=True)
    assert read_card(path / "model.json").quantization["speedup_batch64_cpu"] == 0.5


def test_quantize_does_not_publish_an_int8_network_that_decides_otherwise(fixture_data, tmp_path):
    # an outside probe: a RetinaMNIST model with a high-pass input filter changed 10 % of its test decisions as int8,
    # and was published as the version the service serves (here the bar is set past what any network can meet)
    source = tmp_path / "mnist-cnn" / "2"
    shutil.copytree(EXPORTS / "mnist-cnn" / "2", source)
    with pytest.raises(ValueError, match=r"of the test images as version 2 does, below 100\.10%"):
        quantize_version(source, fixture_data, download=False, min_agreement=1.001)
    assert sorted(p.name for p in source.parent.iterdir()) == ["2"]  # nothing published, nothing half-written


def test_the_cards_commit_is_this_checkouts_whatever_the_working_directory(tmp_path, monkeypatch):
    # an outside probe: run from another git repository, the card recorded that repository's commit
    import subprocess

    from training.export import git_commit

    here = git_commit()
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=x", "-c", "user.email=x@y", "commit", "-q",
                    "--allow-empty", "-m", "other"], check=True)
    monkeypatch.chdir(tmp_path)
    assert git_commit() == here


def test_a_multi_label_parity_check_compares_every_labels_decision():
    # the top label alone agreed while another label crossed 0.5: the check passed a changed decision
    from training.export import ExportError, _compare_probs

    expected = np.array([[0.9, 0.50004, 0.1]], np.float32)
    got = np.array([[0.9, 0.49997, 0.1]], np.float32)  # within the tolerance, one label's decision flipped
    assert _compare_probs(expected, got, multi_label=False)["argmax_identical"]
    with pytest.raises(ExportError, match="labels identical: False"):
        _compare_probs(expected, got, multi_label=True)
    assert _compare_probs(expected, expected, multi_label=True)["labels_identical"]


def test_a_parity_check_refuses_probabilities_that_are_not_finite():
    # an outside probe: a diverged model's NaN probabilities passed (NaN > tolerance is False) and were published
    from training.export import ExportError, _compare_probs

    nan = np.full((2, 3), np.nan, np.float32)
    for multi_label in (False, True):
        with pytest.raises(ExportError, match="not finite"):
            _compare_probs(nan, nan, multi_label)


def test_a_card_records_how_much_of_plain_bordered_training_images_their_strokes_fill(trained, fixture_data, tmp_path):
    # what /classify frames an upload of another size to (serving.images); the fixtures' borders are not plain,
    # so this one's training images get a black frame
    data = tmp_path / "data"
    shutil.copytree(fixture_data, data)
    npz = data / "medmnist" / "pneumoniamnist.npz"
    arrays = dict(np.load(npz))
    images = arrays["train_images"].copy()
    images[:, :4], images[:, -4:], images[:, :, :4], images[:, :, -4:] = 0, 0, 0, 0
    np.savez(npz, **{**arrays, "train_images": images})
    path = export_checkpoint(trained["pneumoniamnist"], tmp_path / "repo", data_dir=data, download=False)
    card = read_card(path / "model.json")
    assert card.input_background == 0 and card.input_strokes_share is not None
    assert card.input_strokes_share == strokes_share(images, 0)
