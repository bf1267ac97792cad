"""The models committed in exports/ are what their cards say: hashes, shapes, and (with the real data)
the test metrics, re-measured on the committed ONNX files."""

import json

import onnxruntime as ort
import pytest

from serving.model_card import file_sha256, read_card
from tests.conftest import EXPORTS
from training.config import TrainConfig
from training.shipped import SHIPPED, SHIPPED_NAMES, shipped


def versions() -> list:
    return sorted(p for name in SHIPPED_NAMES for p in (EXPORTS / name).iterdir() if p.name.isdigit())


def test_the_shipped_models_are_in_exports_and_small():
    for name in SHIPPED_NAMES:
        assert any((EXPORTS / name).iterdir()), name
    total = sum(f.stat().st_size for f in EXPORTS.rglob("*") if f.is_file())
    assert total <= 25 * 1024 * 1024


def test_each_shipped_entry_is_its_config_with_targets():
    for model in SHIPPED:
        cfg = TrainConfig.load(model.config)
        assert (cfg.name, cfg.dataset) == (model.name, model.dataset)
    targets = shipped("pneumoniamnist-cnn").targets
    assert targets.met({"acc": 0.91, "auc": 0.98}) is True
    assert targets.met({"acc": 0.91, "auc": 0.96}) is False and targets.met({"acc": 0.89, "auc": 0.98}) is False
    assert shipped("pneumoniamnist-transfer").targets.met({"acc": 0.0, "auc": 0.0}) is None  # no target
    with pytest.raises(ValueError, match="'retinamnist-cnn' is not a shipped model; shipped: mnist-cnn, "):
        shipped("retinamnist-cnn")


@pytest.mark.parametrize("path", versions(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_card_matches_the_onnx_file(path):
    card = read_card(path / "model.json")
    assert (card.name, str(card.version)) == (path.parent.name, path.name)
    assert card.sha256 == file_sha256(path / "model.onnx")
    assert card.training["command"].startswith("python -m training")
    assert len(card.training["git_commit"]) >= 40
    session = ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[1:] == card.input.shape
    assert session.get_outputs()[0].name == "probs"


@pytest.mark.slow
@pytest.mark.parametrize("path", versions(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_card_metrics_reproduce_on_the_real_test_split(real_data, path):
    from training.evaluate import evaluate_path

    card = read_card(path / "model.json")
    measured = evaluate_path(path, "test", data_dir=real_data, download=False)
    assert measured["n"] == card.metrics["test"]["n"]
    assert measured["acc"] == pytest.approx(card.metrics["test"]["acc"], abs=1e-6)
    assert measured["auc"] == pytest.approx(card.metrics["test"]["auc"], abs=1e-6)
    assert shipped(card.name).targets.met(measured) is not False, json.dumps(card.metrics)
