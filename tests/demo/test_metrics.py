"""Top-label ECE from confidences alone equals torchmetrics' multiclass ECE."""

from __future__ import annotations

import torch

from laplace_lora_backend.demo.metrics import classification_metrics, top1_ece


def test_top1_ece_equals_torchmetrics_multiclass_ece():
    g = torch.Generator().manual_seed(0)
    probs = (3 * torch.randn(500, 7, generator=g, dtype=torch.float64)).softmax(-1)
    labels = torch.randint(0, 7, (500,), generator=g)
    conf, pred = probs.max(-1)
    ece = top1_ece(conf, pred == labels)
    assert abs(ece - classification_metrics(probs, labels)["ece"]) < 1e-6
    assert ece > 0.05  # random labels: badly calibrated, the check can fail
