"""Prediction needs no labels: every predictive and structure on label-free
dict batches (only `fit` and prior tuning read `dict_key_y`)."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import make_batch, make_loader, make_peft_classifier
from laplace import Laplace

import laplace_lora_backend  # noqa: F401


@pytest.mark.parametrize("structure", ["kron", "diag", "full"])
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"link_approx": "mc", "n_samples": 20},
        {"link_approx": "bridge"},
        {"pred_type": "nn", "link_approx": "mc", "n_samples": 3},
    ],
    ids=["probit", "mc", "bridge", "nn"],
)
def test_predict_without_labels(structure, kwargs):
    model = make_peft_classifier("llama")
    la = Laplace(
        model, "classification", subset_of_weights="lora", hessian_structure=structure
    )
    la.fit(make_loader(make_batch(n=6)))
    labelled = make_batch(n=3, seed=2)
    unlabelled = {k: v for k, v in labelled.items() if k != "labels"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        p = la(unlabelled, **kwargs)
        torch.manual_seed(0)
        q = la(labelled, **kwargs)
    assert torch.equal(p, q)
    assert torch.allclose(p.sum(-1), torch.ones(3, dtype=p.dtype))
    samples = la.functional_samples(unlabelled, n_samples=2)
    assert samples.shape == (2, 3, 3)
