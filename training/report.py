"""Run reports a person can look at: learning curves, confusion matrix, ROC curves, mistakes, summary."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.calibration import calibration_curve
from torchmetrics.functional.classification import binary_roc

from serving.model_card import atomic_write, write_text_atomic
from training.calibration import N_BINS, reliability_points
from training.data import DatasetSpec, Split
from training.evaluate import predicted_labels
from training.models import Classifier, Ensemble


def write_report(run_dir: Path, model: Classifier | Ensemble, spec: DatasetSpec, history: list[dict[str, float]],
                 test: Split, probs: torch.Tensor, metrics: dict[str, Any], uncalibrated: torch.Tensor) -> None:
    """The run's plots; ``probs`` are the temperature-scaled test probabilities, ``uncalibrated`` those before."""
    plot_learning_curves(history, run_dir / "learning_curves.png")
    plot_reliability_diagram({"uncalibrated": uncalibrated, "temperature-scaled": probs}, test.labels,
                             spec.task.startswith("multi-label"), run_dir / "reliability_diagram.png",
                             f"{spec.flag} test reliability")
    plot_confusion_matrix(metrics, spec, run_dir / "confusion_matrix.png")
    plot_roc_curves(spec, test.labels, probs, run_dir / "roc_curves.png")
    plot_misclassified(spec, test, probs, run_dir / "misclassified.png")
    write_model_summary(model, spec, run_dir)


def plot_learning_curves(history: list[dict[str, float]], path: Path) -> None:
    """Loss and accuracy / AUC per epoch; an ensemble's history has a ``member`` column: one line each."""
    members: dict[int, list[dict[str, float]]] = {}
    for row in history:
        members.setdefault(int(row.get("member", 0)), []).append(row)
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    suffix, alpha = (f" ({len(members)} members)", 0.45) if len(members) > 1 else ("", 0.9)
    lines = [(ax_loss, "train_loss", "o-", "C0", "train"), (ax_loss, "val_loss", "o-", "C1", "val"),
             (ax_metric, "train_acc", "o-", "C0", "train acc"), (ax_metric, "val_acc", "o-", "C1", "val acc"),
             (ax_metric, "val_auc", "s--", "C2", "val AUC")]
    for k, rows in members.items():
        epochs = [h["epoch"] for h in rows]
        for ax, key, style, color, label in lines:
            ax.plot(epochs, [h[key] for h in rows], style, color=color, alpha=alpha,
                    label=None if k else label + suffix)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_metric.set(xlabel="epoch", title="Accuracy / AUC")
    for ax in (ax_loss, ax_metric):
        ax.grid(alpha=0.3)
        ax.legend()
    _save(fig, path)


def plot_confusion_matrix(metrics: dict[str, Any], spec: DatasetSpec, path: Path) -> None:
    cm = np.array(metrics["confusion_matrix"])
    if cm.ndim == 3:  # multi-label: one 2x2 per label; show per-label recall/precision counts summed
        cm = cm.sum(0)
        names = ["negative", "positive"]
    else:
        names = [_short(n) for n in spec.labels]
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(names) + 2),) * 2)
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set(xlabel="predicted", ylabel="true", title=f"{spec.flag} test confusion matrix")
    _save(fig, path)


ROC_STYLES = ("-", "--", "-.")  # past 20 curves, colours come round again in another line style


def plot_roc_curves(spec: DatasetSpec, labels: torch.Tensor, probs: torch.Tensor, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 5))
    if spec.task == "binary-class":
        curves = [(spec.labels[-1], probs[:, -1], labels)]
    elif spec.task == "multi-label, binary-class":
        curves = [(name, probs[:, i], labels[:, i]) for i, name in enumerate(spec.labels)]
    else:
        curves = [(name, probs[:, i], (labels == i).long()) for i, name in enumerate(spec.labels)]
    # one colour each: tab10 repeated its colours past 10 curves (chestmnist's 14 labels, organmnist3d's 11)
    colours = plt.get_cmap("tab10").colors if len(curves) <= 10 else plt.get_cmap("tab20").colors[0::2] + \
        plt.get_cmap("tab20").colors[1::2]  # tab20's dark / light pairs apart: neighbours in the legend differ in hue
    for k, (name, score, target) in enumerate(curves):
        if target.min() == target.max():
            continue  # ROC is undefined for a class absent from the split
        fpr, tpr, _ = binary_roc(score.double(), target.long())
        ax.plot(fpr, tpr, color=colours[k % len(colours)], linestyle=ROC_STYLES[k // len(colours) % len(ROC_STYLES)],
                label=_short(name))
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"{spec.flag} test ROC (one-vs-rest)")
    ax.legend(fontsize=7)
    _save(fig, path)


def plot_misclassified(spec: DatasetSpec, test: Split, probs: torch.Tensor, path: Path, n: int = 24) -> None:
    pred = predicted_labels(spec.task, probs)
    wrong = (pred != test.labels).any(1) if pred.dim() == 2 else pred != test.labels
    idx = wrong.nonzero().flatten()[:n].tolist()
    cols = 6
    rows = max(1, -(-len(idx) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.8, rows * 2.0), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, idx, strict=False):
        img = test.images[i].numpy()
        if spec.is_3d:
            img = img[img.shape[0] // 2]  # middle slice
        ax.imshow(img, cmap=None if img.ndim == 3 else "gray")
        if pred.dim() == 1:
            ax.set_title(f"true {_short(spec.labels[test.labels[i]])}\npred {_short(spec.labels[pred[i]])}", fontsize=7)
        else:
            ax.set_title(f"{int((pred[i] != test.labels[i]).sum())} labels wrong", fontsize=7)
    fig.suptitle(f"{spec.flag}: {int(wrong.sum())} of {len(wrong)} test images misclassified (first {len(idx)})")
    _save(fig, path)


def plot_reliability_diagram(curves: dict[str, torch.Tensor], labels: torch.Tensor, multi_label: bool, path: Path,
                             title: str) -> None:
    """Reliability diagram: per confidence bin (15 equal-width), how often the top label is right (for multi-label
    heads: how often a label is present) against the mean confidence, one line per entry of ``curves``
    (e.g. ``{"before": probs, "after": calibrated_probs}``), with the confidence histogram below."""
    fig, (ax, ax_hist) = plt.subplots(2, 1, figsize=(5, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], "k:", lw=1, label="perfectly calibrated")
    bins = np.linspace(0, 1, N_BINS + 1)
    for name, probs in curves.items():
        confidence, outcome = reliability_points(probs, labels, multi_label)
        frequency, mean_confidence = calibration_curve(outcome, confidence, n_bins=N_BINS, strategy="uniform")
        ax.plot(mean_confidence, frequency, "o-", label=name)
        ax_hist.hist(confidence, bins=bins, histtype="step", lw=1.5, label=name)
    ax.set(ylabel="fraction of positives" if multi_label else "accuracy", xlim=(0, 1), ylim=(0, 1), title=title)
    ax_hist.set(xlabel="P(label present)" if multi_label else "confidence (top-label probability)", ylabel="count",
                yscale="log")
    for a in (ax, ax_hist):
        a.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def write_model_summary(model: Classifier | Ensemble, spec: DatasetSpec, run_dir: Path) -> None:
    from torchinfo import summary

    example = torch.zeros((2, *spec.image_shape), dtype=torch.uint8)
    text = str(summary(model, input_data=[example], verbose=0, depth=4,
                       col_names=("output_size", "num_params", "mult_adds")))
    write_text_atomic(run_dir / "model_summary.txt", text + "\n")
    if shutil.which("dot") is None:
        write_text_atomic(
            run_dir / "model_graph.txt",
            "torchviz needs graphviz's `dot` to render the model graph: install graphviz "
            "(apt-get install graphviz / brew install graphviz) and re-run the training command.\n")
        return
    from torchviz import make_dot

    out = model(example)
    graph = make_dot(out, params=dict(model.named_parameters()))
    graph.render(str(run_dir / "model_graph"), format="svg", cleanup=True)


def _short(name: str, width: int = 14) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def _save(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format=path.suffix[1:], dpi=110)
    plt.close(fig)
