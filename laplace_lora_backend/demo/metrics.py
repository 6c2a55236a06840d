"""Calibration metrics of predicted class probabilities (torchmetrics).

Accuracy, top-label expected calibration error with 15 equal-width bins
(`torchmetrics.CalibrationError(task="multiclass", n_bins=15)`, the paper's
convention), negative log-likelihood and Brier score, all as fractions.
Metric objects are created per call, so no state leaks between evaluations.
"""

from __future__ import annotations

import torch

from laplace_lora_backend.prior_validation import nll

__all__ = ["classification_metrics", "reliability_bins"]


def classification_metrics(
    probs: torch.Tensor, labels: torch.Tensor
) -> dict[str, float]:
    """Metrics of probabilities `(n, C)` against integer labels `(n,)`.

    Returns
    -------
    metrics : dict
        ``acc``, ``ece``, ``nll``, ``brier`` (Brier: mean over examples of the
        squared distance to the one-hot label, summed over classes).
    """
    from torchmetrics.classification import (
        MulticlassAccuracy,
        MulticlassCalibrationError,
    )

    probs = probs.detach().double().cpu()
    labels = labels.detach().long().cpu()
    C = probs.shape[1]
    acc = MulticlassAccuracy(num_classes=C, average="micro")(probs, labels)
    ece = MulticlassCalibrationError(num_classes=C, n_bins=15, norm="l1")(probs, labels)
    nll_value = nll(probs, labels)
    onehot = torch.nn.functional.one_hot(labels, C).double()
    brier = (probs - onehot).square().sum(1).mean()
    return {
        "acc": float(acc),
        "ece": float(ece),
        "nll": float(nll_value),
        "brier": float(brier),
    }


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15):
    """Per-bin confidence, accuracy and count of the top-label prediction.

    Returns
    -------
    conf, acc, count : torch.Tensor
        `(n_bins,)` each (NaN where a bin is empty).
    """
    conf, pred = probs.detach().double().cpu().max(1)
    correct = (pred == labels.cpu()).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    idx = torch.bucketize(conf, edges[1:-1], right=True)
    count = torch.bincount(idx, minlength=n_bins).double()
    s_conf = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, conf)
    s_acc = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, correct)
    return s_conf / count, s_acc / count, count
