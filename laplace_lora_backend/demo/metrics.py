"""Calibration metrics of predicted class probabilities (torchmetrics).

Accuracy, top-label expected calibration error with 15 equal-width bins
(`torchmetrics.CalibrationError(task="multiclass", n_bins=15)`, the paper's
convention), negative log-likelihood and Brier score, all as fractions.
Metric objects are created per call, so no state leaks between evaluations.
"""

from __future__ import annotations

import torch

from laplace_lora_backend.prior_validation import nll

__all__ = ["classification_metrics", "confidence_bins", "reliability_bins", "top1_ece"]


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
    return confidence_bins(conf, pred == labels.cpu(), n_bins)


def confidence_bins(conf: torch.Tensor, correct: torch.Tensor, n_bins: int = 15):
    """Per-bin mean confidence, accuracy and count of top-label predictions.

    Parameters
    ----------
    conf : torch.Tensor
        `(n,)` probability of each predicted label.
    correct : torch.Tensor
        `(n,)` bool, whether it was the true one.
    n_bins : int, default=15
        Equal-width bins on [0, 1].

    Returns
    -------
    conf, acc, count : torch.Tensor
        `(n_bins,)` each (NaN where a bin is empty).
    """
    conf = conf.detach().double().cpu()
    correct = correct.detach().double().cpu()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    idx = torch.bucketize(conf, edges[1:-1], right=True)
    count = torch.bincount(idx, minlength=n_bins).double()
    s_conf = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, conf)
    s_acc = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, correct)
    return s_conf / count, s_acc / count, count


def top1_ece(conf: torch.Tensor, correct: torch.Tensor, n_bins: int = 15) -> float:
    """Top-label expected calibration error with equal-width bins (L1).

    The same quantity as `classification_metrics`' ECE, from the top-label
    confidences alone (for next-token predictions over a whole vocabulary).

    Parameters
    ----------
    conf : torch.Tensor
        `(n,)` probability of each predicted label.
    correct : torch.Tensor
        `(n,)` bool.
    n_bins : int, default=15

    Returns
    -------
    float
        ``sum_b (count_b / n) |acc_b - conf_b|``.
    """
    c, a, count = confidence_bins(conf, correct, n_bins)
    keep = count > 0
    return float((count[keep] * (a[keep] - c[keep]).abs()).sum() / count.sum())
