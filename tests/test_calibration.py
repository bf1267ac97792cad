"""Temperature scaling: the fit finds a known temperature, the metrics match hand computations, and folding
the temperature into an ONNX graph calibrates ``probs`` while ``logits`` and every decision stay the same."""

import math
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from serving.model_card import file_sha256, read_card
from tests.conftest import EXPORTS
from tests.test_train import tiny
from training.calibration import at_search_limit, calibration_metrics, fit_temperature, probabilities
from training.data import dataset_spec
from training.export import calibrate_version, export_onnx, fold_temperature
from training.models import build_model


def run_onnx(path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probs, logits = ort.InferenceSession(str(path)).run(["probs", "logits"], {"images": images})
    return probs, logits


@pytest.mark.parametrize("true_temperature", [0.5, 2.0])
def test_fit_recovers_the_temperature_that_generated_the_labels(true_temperature):
    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(20_000, 5, generator=gen)
    labels = torch.multinomial(torch.softmax(logits / true_temperature, 1), 1, generator=gen).flatten()
    (fitted,) = fit_temperature(logits, labels, multi_label=False).tolist()
    assert fitted == pytest.approx(true_temperature, rel=0.05)
    before = calibration_metrics(logits, labels, "multi-class")
    after = calibration_metrics(logits, labels, "multi-class", torch.tensor([fitted]))
    assert after["ece"] < 0.02 < before["ece"] and after["nll"] < before["nll"] and after["brier"] < before["brier"]


def test_fit_gives_each_label_of_a_multi_label_head_its_own_temperature():
    gen = torch.Generator().manual_seed(1)
    true_temperatures = torch.tensor([0.5, 1.0, 3.0])
    logits = 3 * torch.randn(20_000, 3, generator=gen)
    labels = torch.bernoulli(torch.sigmoid(logits / true_temperatures), generator=gen).long()
    fitted = fit_temperature(logits, labels, multi_label=True)
    torch.testing.assert_close(fitted, true_temperatures, rtol=0.08, atol=0)


def test_a_temperature_that_stopped_at_the_search_limit_is_named():
    gen = torch.Generator().manual_seed(2)
    logits = 3 * torch.randn(5_000, 2, generator=gen)
    informative = torch.bernoulli(torch.sigmoid(logits[:, :1]), generator=gen)
    noise = torch.bernoulli(torch.full((5_000, 1), 0.5), generator=gen)  # a label the logits know nothing about
    fitted = fit_temperature(logits, torch.cat([informative, noise], 1).long(), multi_label=True)
    assert at_search_limit(fitted) == [1] and fitted[1] == pytest.approx(20, rel=1e-3)


def test_a_head_that_separates_its_val_split_perfectly_is_named_at_the_lower_limit():
    # an outside probe: such heads got T = 0.068 or 0.072 (the search stopped where the NLL was already flat at 0),
    # unflagged, while the README says they end at 0.05 and are listed
    gen = torch.Generator().manual_seed(11)  # one where the search stopped inside, at T = 0.0527 (NLL 6e-18)
    labels = torch.randint(0, 7, (120,), generator=gen)
    margin = torch.rand(120, generator=gen) * 30 + 1
    logits = margin[:, None] * torch.nn.functional.one_hot(labels, 7) + torch.randn(120, 7, generator=gen) * 0.3
    fitted = fit_temperature(logits, labels, multi_label=False)
    assert at_search_limit(fitted) == [0] and fitted[0] == pytest.approx(0.05, rel=1e-3)


def test_metrics_match_a_hand_computed_example():
    # top-label confidences 0.95 (right), 0.90 (wrong), 0.62 (right), 0.62 (right); 15 bins of width 1/15 put
    # 0.95 and 0.90 in separate bins (10 bins would not): ECE = (0.05 + 0.90 + 2 * 0.38) / 4
    probs = torch.tensor([[0.95, 0.03, 0.02], [0.90, 0.06, 0.04], [0.20, 0.62, 0.18], [0.18, 0.20, 0.62]],
                         dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 2])
    got = calibration_metrics(probs.log(), labels, "multi-class")  # log-probabilities are logits of these probs
    assert got["ece"] == pytest.approx((0.05 + 0.90 + 2 * 0.38) / 4)
    assert got["nll"] == pytest.approx(-(math.log(0.95) + math.log(0.06) + 2 * math.log(0.62)) / 4)
    brier = [0.05**2 + 0.03**2 + 0.02**2, 0.90**2 + 0.94**2 + 0.04**2, 0.2**2 + 0.38**2 + 0.18**2,
             0.18**2 + 0.2**2 + 0.38**2]
    assert got["brier"] == pytest.approx(sum(brier) / 4)


def test_binary_and_multi_label_metrics_match_hand_computed_examples():
    # binary-class: top-label ECE over both outputs, Brier of the positive column
    p = torch.tensor([0.9, 0.2, 0.7], dtype=torch.float64)  # P(positive); labels 1, 1, 0
    got = calibration_metrics(torch.stack([(1 - p).log(), p.log()], 1), torch.tensor([1, 1, 0]), "binary-class")
    # confidences 0.9 (right), 0.8 (wrong), 0.7 (wrong): three bins
    assert got["ece"] == pytest.approx((0.1 + 0.8 + 0.7) / 3)
    assert got["brier"] == pytest.approx((0.1**2 + 0.8**2 + 0.7**2) / 3)
    # multi-label: the mean of the labels' binary ECEs (confidence = P(present)), BCE and Brier over all entries
    probs = torch.tensor([[0.9, 0.3], [0.8, 0.3]], dtype=torch.float64)
    labels = torch.tensor([[1, 0], [0, 1]])
    got = calibration_metrics(torch.logit(probs), labels, "multi-label, binary-class")
    # label 0: 0.9 and 0.8 share no bin: |1 - 0.9| and |0 - 0.8|; label 1: one bin, mean 0.3 vs frequency 0.5
    assert got["ece"] == pytest.approx(((0.1 + 0.8) / 2 + 0.2) / 2)
    assert got["nll"] == pytest.approx(-(math.log(0.9) + math.log(0.7) + math.log(0.2) + math.log(0.3)) / 4)
    assert got["brier"] == pytest.approx((0.1**2 + 0.3**2 + 0.8**2 + 0.7**2) / 4)


def test_folding_into_the_graph_calibrates_probs_and_keeps_logits_and_decisions(tmp_path):
    # a multi-label head: one temperature per label (softmax heads: test_calibrate_publishes_the_next_version...)
    spec = dataset_spec("chestmnist")
    torch.manual_seed(0)
    model = build_model(spec, tiny("chestmnist")).eval()
    temperature = torch.linspace(0.4, 2.5, spec.num_outputs)
    export_onnx(model, spec, tmp_path / "plain.onnx")
    onnx.save(fold_temperature(onnx.load(str(tmp_path / "plain.onnx")), temperature, True),
              str(tmp_path / "folded.onnx"))
    export_onnx(model, spec, tmp_path / "wrapped.onnx", temperature)  # the training-time path: ExportWrapper
    images = np.random.default_rng(0).integers(0, 256, size=(32, *spec.image_shape), dtype=np.uint8)
    plain_probs, plain_logits = run_onnx(tmp_path / "plain.onnx", images)
    expected = probabilities(torch.from_numpy(plain_logits), True, temperature).numpy()
    for path in (tmp_path / "folded.onnx", tmp_path / "wrapped.onnx"):
        probs, logits = run_onnx(path, images)
        np.testing.assert_allclose(logits, plain_logits, atol=1e-5)
        np.testing.assert_allclose(probs, expected, atol=1e-6)
        assert np.abs(probs - plain_probs).max() > 1e-3  # the temperature did something
        assert ((probs > 0.5) == (plain_probs > 0.5)).all()
    with pytest.raises(ValueError, match="cannot fold a temperature"):
        fold_temperature(onnx.load(str(tmp_path / "folded.onnx")), temperature, True)


def test_calibrate_publishes_the_next_version_and_leaves_the_source_alone(fixture_data, tmp_path):
    shutil.copytree(EXPORTS / "mnist-cnn" / "1", tmp_path / "mnist-cnn" / "1")
    source = tmp_path / "mnist-cnn" / "1"
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    assert read_card(source / "model.json").calibration is None  # cards from before calibration still load
    path = calibrate_version(source, fixture_data, download=False, command="python -m training calibrate x")
    assert path == tmp_path / "mnist-cnn" / "2"
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before
    card, old = read_card(path / "model.json"), read_card(source / "model.json")
    assert card.version == 2 and card.sha256 == file_sha256(path / "model.onnx")
    assert card.training["command"] == "python -m training calibrate x"
    assert card.training["calibrated_from"]["sha256"] == old.sha256
    assert card.training["config"] == old.training["config"]
    (temperature,) = card.calibration["temperature"]
    assert set(card.calibration["test"]["before"]) == {"ece", "nll", "brier"} and card.calibration["val"]["n"] == 50
    images = np.random.default_rng(0).integers(0, 256, size=(16, 28, 28), dtype=np.uint8)
    old_probs, old_logits = run_onnx(source / "model.onnx", images)
    probs, logits = run_onnx(path / "model.onnx", images)
    np.testing.assert_array_equal(logits, old_logits)
    np.testing.assert_allclose(probs, torch.softmax(torch.from_numpy(logits) / temperature, 1).numpy(), atol=1e-6)
    assert (probs.argmax(1) == old_probs.argmax(1)).all()
    props = {p.key: p.value for p in onnx.load(str(path / "model.onnx")).metadata_props}
    assert props["cnnserve.version"] == "2"
    with pytest.raises(ValueError, match="calibrated already"):
        calibrate_version(path, fixture_data, download=False)
