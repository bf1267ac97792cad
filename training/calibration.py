"""Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", 2017) and calibration metrics.

A softmax head (multi-class, binary with 2 outputs, ordinal) gets one temperature ``T``:
``probs = softmax(logits / T)``. A sigmoid head (multi-label) gets one temperature per label,
``probs[:, j] = sigmoid(logits[:, j] / T[j])``: its labels are separate binary problems with their own base
rates and over- or under-confidence, its NLL is a sum of per-label terms, so each label's fit is an
independent one-parameter problem (and a shared T would trade one label's calibration for another's).
Dividing logits by ``T > 0`` changes no argmax and no 0.5 threshold, so ACC stays what it was; binary and
multi-label AUC stay too (each score is a monotone function of its logit).

``T`` is fitted on the validation split, after model selection, by minimising its NLL. The NLL is convex in
``1 / T`` (a log-sum-exp of functions linear in it), so a bounded scalar search finds the global minimum.

Metrics (``calibration_metrics``):
- ECE: top-label expected calibration error over 15 equal-width confidence bins (softmax heads); for
  multi-label heads the mean over labels of each label's binary ECE (confidence = P(label present)).
- NLL: mean negative log-likelihood of the labels (multi-label: mean over labels of the binary NLL).
- Brier: mean squared error of the probabilities against one-hot labels, summed over classes
  (multi-class, ordinal); of the positive column (binary-class: the score clients threshold); mean
  over labels (multi-label).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar
from torchmetrics.functional.classification import binary_calibration_error, multiclass_calibration_error

N_BINS = 15
INVERSE_TEMPERATURE_BOUNDS = (0.05, 20.0)  # 1 / T, i.e. temperatures from 0.05 to 20
METHOD = ("temperature scaling: probs = softmax(logits / T) (sigmoid(logits / T_label) for multi-label heads), "
          "T fitted on the val split by minimising NLL; logits unchanged")
METRICS = ("ECE: top-label, 15 equal-width bins (multi-label: mean per-label binary ECE); NLL: mean negative "
           "log-likelihood; Brier: mean squared error of the probabilities (summed over classes; binary-class: "
           "positive column; multi-label: mean over labels)")


def probabilities(logits: torch.Tensor, multi_label: bool, temperature: torch.Tensor | None = None) -> torch.Tensor:
    """What a head outputs: ``softmax(logits / T)`` over classes, or ``sigmoid(logits / T)`` per label."""
    if temperature is not None:
        logits = logits / temperature.to(logits)
    return torch.sigmoid(logits) if multi_label else torch.softmax(logits, dim=1)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """The NLL-minimising temperature: shape (1,) for a softmax head, (L,) for a multi-label head's L labels."""
    logits = torch.as_tensor(logits).double()
    labels = torch.as_tensor(labels)
    if multi_label:
        columns = [(logits[:, j : j + 1], labels[:, j : j + 1].double()) for j in range(logits.shape[1])]
        return torch.tensor([_fit_one(z, y, _sigmoid_nll) for z, y in columns], dtype=torch.float32)
    return torch.tensor([_fit_one(logits, labels.long(), F.cross_entropy)], dtype=torch.float32)


def _sigmoid_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, labels)


def _fit_one(logits: torch.Tensor, labels: torch.Tensor, nll) -> float:
    """1 / the inverse temperature that minimises ``nll``; a bound of the search when it does at least as well as
    the search's answer: the NLL has no minimum inside (a split the head separates perfectly has its NLL fall to 0
    towards T = 0, and the search stopped where it was already flat, at T = 0.068 or 0.072, unflagged)."""
    def loss(beta: float) -> float:
        return float(nll(logits * beta, labels))

    beta = float(minimize_scalar(loss, bounds=INVERSE_TEMPERATURE_BOUNDS, method="bounded",
                                 options={"xatol": 1e-6}).x)
    best = loss(beta)
    for bound in INVERSE_TEMPERATURE_BOUNDS:
        if (at_bound := loss(bound)) <= best:
            beta, best = bound, at_bound
    return 1.0 / beta


def calibration_metrics(logits: torch.Tensor, labels: torch.Tensor, task: str,
                        temperature: torch.Tensor | None = None) -> dict[str, float]:
    """ECE, NLL and Brier score of ``probabilities(logits / temperature)`` (see the module docstring)."""
    logits, labels = torch.as_tensor(logits).double(), torch.as_tensor(labels).long()
    if temperature is not None:
        logits = logits / torch.as_tensor(temperature).double()
    if task == "multi-label, binary-class":
        probs = torch.sigmoid(logits)
        ece = torch.stack([binary_calibration_error(probs[:, j].contiguous(), labels[:, j].contiguous(), n_bins=N_BINS)
                           for j in range(labels.shape[1])]).mean()
        nll = F.binary_cross_entropy_with_logits(logits, labels.double())
        brier = (probs - labels).pow(2).mean()
    else:
        probs = torch.softmax(logits, dim=1)
        ece = multiclass_calibration_error(probs, labels, probs.shape[1], n_bins=N_BINS)
        nll = F.cross_entropy(logits, labels)
        one_hot = F.one_hot(labels, probs.shape[1]).double()
        if task == "binary-class":
            brier = (probs[:, -1] - one_hot[:, -1]).pow(2).mean()
        else:
            brier = (probs - one_hot).pow(2).sum(1).mean()
    return {"ece": float(ece), "nll": float(nll), "brier": float(brier)}


def at_search_limit(temperature: torch.Tensor) -> list[int]:
    """Which temperatures (their indices) stopped at the search's limit, 0.05 or 20: the val NLL had no minimum
    inside, e.g. a head (or label) that has learned nothing, whose best probability is the base rate (T -> inf).
    Such a temperature is a bound, not a fit; the card says so."""
    limits = [1 / beta for beta in INVERSE_TEMPERATURE_BOUNDS]
    return [i for i, t in enumerate(temperature.tolist()) if any(abs(t - limit) <= 1e-3 * limit for limit in limits)]


def calibration_report(temperature: torch.Tensor, task: str,
                       splits: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """The model card's ``calibration`` section: the temperature(s), how they were fitted and what they do.

    ``splits`` maps a split name to (logits, labels); the val split is the one ``temperature`` was fitted on."""
    report: dict = {"method": METHOD, "temperature": [round(float(t), 6) for t in temperature],
                    "fitted_on": "val", "metrics": METRICS, "at_search_limit": at_search_limit(temperature)}
    for name, (logits, labels) in splits.items():
        report[name] = {"n": len(labels), "before": calibration_metrics(logits, labels, task),
                        "after": calibration_metrics(logits, labels, task, temperature)}
    return report


def reliability_points(probs: torch.Tensor, labels: torch.Tensor, multi_label: bool) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, outcome) pairs a reliability diagram bins: top-label confidence and whether the top label is
    right (softmax heads), or every label's P(present) and whether it is present (multi-label, pooled)."""
    probs, labels = torch.as_tensor(probs).double(), torch.as_tensor(labels).long()
    if multi_label:
        return probs.flatten().numpy(), labels.flatten().double().numpy()
    confidence, predicted = probs.max(1)
    return confidence.numpy(), (predicted == labels).double().numpy()
