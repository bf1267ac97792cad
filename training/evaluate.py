"""Predictions and metrics.

ACC and AUC follow MedMNIST's own ``medmnist.Evaluator`` per task type (tests check equality):
- binary-class: score = positive (last) column; ACC at threshold 0.5; AUC of that score.
- multi-class / ordinal-regression: ACC of the argmax; AUC = mean one-vs-rest AUC over classes.
- multi-label: ACC and AUC are means over labels (ACC at threshold 0.5).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils._pytree import tree_leaves
from torchmetrics import functional as tmf

from training.calibration import probabilities
from training.data import Batches, DatasetSpec, Split

# the most elements one activation of an inference batch may hold (256 MB of float32): a 3D model at 64^3 ran the
# whole 298-volume test split of AdrenalMNIST3D at once (eval_batch_size 512), 5 GB for its first layer's output
# alone, and could not be evaluated or exported on a 24 GB machine
ACTIVATION_BUDGET = 1 << 26
UNKNOWN_WIDTH = 32  # an ONNX graph whose shapes are unknown: its largest activation taken as this many x the input


def inference_batch_size(per_image: int, cap: int) -> int:
    """Images per inference batch: ``cap`` (``eval_batch_size``), fewer where one image's largest activation
    (``per_image`` elements) would put a batch over ``ACTIVATION_BUDGET``."""
    return max(1, min(cap, ACTIVATION_BUDGET // max(1, per_image)))


@torch.no_grad()
def largest_activation(model: torch.nn.Module, image: torch.Tensor) -> int:
    """Elements of the largest output any module of ``model`` makes for one image (``image``: a batch of one), the
    image included; tensors made by plain function calls inside a ``forward`` are not seen."""
    largest = [image.numel()]

    def record(module: torch.nn.Module, inputs: Any, output: Any) -> None:
        for leaf in tree_leaves(output):  # a module may answer a tuple, list or dict of tensors
            if isinstance(leaf, torch.Tensor):
                largest[0] = max(largest[0], leaf.numel())

    hooks = [m.register_forward_hook(record) for m in model.modules()]
    try:
        model(image)
    finally:
        for hook in hooks:
            hook.remove()
    return largest[0]


@torch.no_grad()
def predict_logits(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 512,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Logits (N, K) of a ``Classifier`` or ``Ensemble`` on uint8 images, as float32 on the CPU, in batches of at
    most ``batch_size`` images (``inference_batch_size``)."""
    model.eval()
    if len(images):
        batch_size = inference_batch_size(largest_activation(model, images[:1].to(device)), batch_size)
    out = [model(batch).float().cpu() for batch, _ in Batches(Split(images, torch.zeros(len(images))), batch_size,
                                                              device=device)]
    return torch.cat(out)


def predict_torch(model: torch.nn.Module, images: torch.Tensor, multi_label: bool, batch_size: int = 512,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Probabilities (N, K) of a ``Classifier`` or ``Ensemble`` on uint8 images, on the CPU (no temperature)."""
    return probabilities(predict_logits(model, images, batch_size, device), multi_label)


def predict_onnx(path: Path, images: np.ndarray, batch_size: int = 512, output: str = "probs") -> np.ndarray:
    """One output (``probs`` or ``logits``, (N, K)) of an exported model, through onnxruntime on the CPU, in
    batches of at most ``batch_size`` images (``inference_batch_size``)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch_size = inference_batch_size(onnx_largest_activation(path, images.shape[1:]), batch_size)
    return np.concatenate([
        session.run([output], {"images": images[i : i + batch_size]})[0] for i in range(0, len(images), batch_size)
    ])


def onnx_largest_activation(path: Path, image_shape: tuple[int, ...]) -> int:
    """Elements of the largest tensor an ONNX graph makes per image, the image included, from its inferred shapes
    (the batch dimension left out); ``UNKNOWN_WIDTH`` x the image where no intermediate shape is known."""
    import onnx

    image = math.prod(image_shape)
    try:
        values = onnx.shape_inference.infer_shapes(onnx.load(str(path))).graph.value_info
    except Exception:  # shape inference gives a size hint only: whatever stops it (a graph over 2 GB...)
        values = []
    sizes = []
    for value in values:
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in value.type.tensor_type.shape.dim[1:]]
        if dims and all(dims):
            sizes.append(math.prod(dims))
    return max(image, *sizes) if sizes else UNKNOWN_WIDTH * image


def predicted_labels(task: str, probs: torch.Tensor) -> torch.Tensor:
    if task == "multi-label, binary-class":
        return (probs > 0.5).long()
    if task == "binary-class":
        return (probs[:, -1] > 0.5).long()
    return probs.argmax(1)


def headline_metrics(task: str, probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """ACC and AUC exactly as ``medmnist.Evaluator`` defines them for ``task``.

    Predictions are thresholded here (``> 0.5``, as MedMNIST does), so torchmetrics never mistakes
    scores for logits."""
    probs, labels = probs.double(), labels.long()
    pred = predicted_labels(task, probs)
    if task == "multi-label, binary-class":
        n = labels.shape[1]
        acc = tmf.classification.multilabel_accuracy(pred, labels, n, average="macro")
        auc = tmf.classification.multilabel_auroc(probs, labels, n, average="macro")
    elif task == "binary-class":
        acc = tmf.classification.binary_accuracy(pred, labels)
        auc = tmf.classification.binary_auroc(probs[:, -1], labels)
    else:
        k = probs.shape[1]
        acc = tmf.classification.multiclass_accuracy(pred, labels, k, average="micro")
        auc = tmf.classification.multiclass_auroc(probs, labels, k, average="macro")
    return {"acc": float(acc), "auc": float(auc)}


def full_metrics(task: str, probs: torch.Tensor, labels: torch.Tensor, label_names: list[str]) -> dict[str, Any]:
    """Headline metrics plus confusion matrix and per-class precision / recall / F1."""
    metrics: dict[str, Any] = headline_metrics(task, probs, labels)
    pred = predicted_labels(task, probs)
    if task == "multi-label, binary-class":
        n = labels.shape[1]
        metrics["confusion_matrix"] = tmf.classification.multilabel_confusion_matrix(pred, labels, n).tolist()
        per = {name: fn(pred, labels, n, average=None).tolist() for name, fn in [
            ("precision", tmf.classification.multilabel_precision),
            ("recall", tmf.classification.multilabel_recall),
            ("f1", tmf.classification.multilabel_f1_score)]}
    else:
        k = len(label_names)
        metrics["confusion_matrix"] = tmf.classification.multiclass_confusion_matrix(pred, labels, k).tolist()
        per = {name: fn(pred, labels, k, average=None).tolist() for name, fn in [
            ("precision", tmf.classification.multiclass_precision),
            ("recall", tmf.classification.multiclass_recall),
            ("f1", tmf.classification.multiclass_f1_score)]}
    metrics["per_class"] = {
        label: {m: round(per[m][i], 6) for m in per} for i, label in enumerate(label_names)
    }
    metrics["n"] = len(labels)
    return metrics


def check_fits(data: DatasetSpec, trained_on: DatasetSpec, path: Path) -> None:
    """A ``ValueError`` unless a model trained on ``trained_on`` can be scored on ``data``: the same image shape,
    task kind and number of outputs (scoring a 14-label model on a binary dataset gave numbers, not an error)."""
    wanted = (data.image_shape, data.task, data.num_outputs)
    if (trained_on.image_shape, trained_on.task, trained_on.num_outputs) != wanted:
        raise ValueError(f"{path} was trained on {trained_on.flag} ({trained_on.task}, {trained_on.num_outputs} "
                         f"outputs, images {list(trained_on.image_shape)}) and cannot be scored on {data.flag} "
                         f"({data.task}, {data.num_outputs} outputs, images {list(data.image_shape)})")


def evaluate_path(path: Path, split: str = "test", dataset: str | None = None, data_dir: Path | None = None,
                  download: bool = True) -> dict[str, Any]:
    """Metrics of a checkpoint (``.pt``) or an exported model (``.onnx`` or its version directory)."""
    from serving.model_card import read_card
    from training.checkpoint import load_model
    from training.data import DEFAULT_DATA_DIR, dataset_spec, load_split

    data_dir = data_dir or DEFAULT_DATA_DIR
    path = path / "model.onnx" if path.is_dir() else path
    if path.suffix == ".onnx":
        card_path = path.parent / "model.json"
        card = read_card(card_path) if card_path.exists() else None
        if dataset is None and card is None:
            raise ValueError(f"{path} has no model.json beside it: pass --dataset")
        spec = dataset_spec(dataset or card.dataset["name"], card.dataset["size"] if card else 28)
        if card is not None:
            check_fits(spec, dataset_spec(card.dataset["name"], card.dataset["size"]), path)
        data = load_split(spec, split, data_dir, download)
        probs = torch.from_numpy(predict_onnx(path, data.images.numpy()))
    else:
        model, cfg, _ = load_model(path)
        spec = dataset_spec(dataset or cfg.dataset, cfg.size)
        check_fits(spec, dataset_spec(cfg.dataset, cfg.size), path)
        data = load_split(spec, split, data_dir, download)
        probs = predict_torch(model, data.images, spec.task.startswith("multi-label"))
    return {"model": str(path), "dataset": spec.flag, "split": split, "task": spec.task,
            **full_metrics(spec.task, probs, data.labels, list(spec.labels))}
