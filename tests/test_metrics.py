"""Our metrics equal medmnist.Evaluator's on the same predictions, for every task type."""

import numpy as np
import pytest
import torch
from medmnist import Evaluator

from training.evaluate import full_metrics, headline_metrics


@pytest.mark.parametrize("flag", ["pneumoniamnist", "retinamnist", "chestmnist", "pathmnist", "organmnist3d"])
def test_acc_and_auc_equal_medmnist_evaluator(fixture_data, flag):
    evaluator = Evaluator(flag, "test", root=str(fixture_data / "medmnist"))
    labels = evaluator.labels
    rng = np.random.default_rng(0)
    k = labels.shape[1] if flag == "chestmnist" else len(evaluator.info["label"])
    scores = rng.random((len(labels), k))
    if flag != "chestmnist":  # probabilities, better than chance so ACC is not trivially equal
        scores[np.arange(len(labels)), labels[:, 0]] += 0.3
        scores = scores / scores.sum(1, keepdims=True)
    expected = evaluator.evaluate(scores)
    y = torch.from_numpy(labels.astype(np.int64))
    ours = headline_metrics(evaluator.info["task"], torch.from_numpy(scores), y if flag == "chestmnist" else y[:, 0])
    assert ours["acc"] == pytest.approx(expected.ACC, abs=1e-6)
    assert ours["auc"] == pytest.approx(expected.AUC, abs=1e-6)


def test_full_metrics_has_confusion_matrix_and_per_class_scores():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    labels = torch.tensor([0, 1, 1, 1])
    m = full_metrics("binary-class", probs, labels, ["normal", "pneumonia"])
    assert m["confusion_matrix"] == [[1, 0], [1, 2]]
    assert m["acc"] == pytest.approx(0.75)
    assert m["per_class"]["pneumonia"]["recall"] == pytest.approx(2 / 3, abs=1e-6)
    assert m["per_class"]["normal"]["precision"] == pytest.approx(0.5)
