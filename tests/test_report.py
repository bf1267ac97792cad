"""The training report's plots."""

import numpy as np
import torch

from training.data import dataset_spec


def test_roc_curves_of_many_labels_are_told_apart(tmp_path, monkeypatch):
    """An outside probe: chestmnist's 14 ROC curves repeated tab10's colours (atelectasis and emphysema both blue)."""
    import training.report as report

    spec = dataset_spec("chestmnist")
    rng = np.random.default_rng(0)
    labels = torch.from_numpy(rng.integers(0, 2, (200, spec.num_outputs)))
    probs = torch.from_numpy(rng.random((200, spec.num_outputs)))
    figures = []
    monkeypatch.setattr(report, "_save", lambda fig, path: figures.append(fig))
    report.plot_roc_curves(spec, labels, probs, tmp_path / "roc.png")
    curves = [line for line in figures[0].axes[0].get_lines() if line.get_label() in map(report._short, spec.labels)]
    assert len(curves) == 14
    assert len({(line.get_color(), line.get_linestyle()) for line in curves}) == 14
