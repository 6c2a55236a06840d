"""bfloat16 models: factors in float32, results close to the float32 model.

Stated tolerance: a bf16 forward pass carries ~3 significant digits (8-bit
mantissa), so on the tiny 2-layer model the bf16 posterior's Kronecker
factors agree with the float32 model's to 5% (relative Frobenius), the log
marginal likelihood to 2% and predictive probabilities to 0.02 absolute.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import make_batch, make_loader, make_peft_classifier, rel_err
from laplace import Laplace

import laplace_lora_backend  # noqa: F401


def fitted(model, structure, **kwargs):
    la = Laplace(
        model,
        "classification",
        subset_of_weights="lora",
        hessian_structure=structure,
        prior_precision=1.0,
        **kwargs,
    )
    torch.manual_seed(0)
    la.fit(make_loader(make_batch(12, T=6), batch_size=4))
    return la


@pytest.mark.parametrize(
    "structure, kwargs",
    [
        ("kron", {"lowrank_threshold": None}),
        ("kron", {"lowrank_threshold": 16, "lowrank_rank": 4}),
        ("diag", {}),
    ],
)
def test_bf16_model_matches_float32(structure, kwargs):
    model32 = make_peft_classifier("llama").float()
    model16 = copy.deepcopy(model32).to(torch.bfloat16)
    la32 = fitted(model32, structure, **kwargs)
    la16 = fitted(model16, structure, **kwargs)

    if structure == "kron":
        H16, H32 = la16.H_facs.to_matrix(), la32.H_facs.to_matrix()
    else:
        H16, H32 = la16.H, la32.H
    assert H16.dtype == torch.float32  # accumulated in float32, not bf16
    assert torch.isfinite(H16).all()
    assert rel_err(H16, H32) < 5e-2

    lml16, lml32 = la16.log_marginal_likelihood(), la32.log_marginal_likelihood()
    assert lml16.dtype == torch.float32
    assert abs(lml16.item() - lml32.item()) < 2e-2 * abs(lml32.item())

    batch = make_batch(5, T=6, seed=3)
    p16, p32 = la16(batch), la32(batch)
    assert p16.dtype == torch.float32
    assert (p16 - p32).abs().max() < 2e-2
    assert torch.allclose(p16.sum(-1), torch.ones(5, dtype=p16.dtype), atol=1e-5)

    # prior tuning and sampling work on the bf16 posterior too
    la16.optimize_prior_precision(method="marglik", n_steps=20)
    assert torch.isfinite(la16.prior_precision).all()
    samples = la16.sample(3)
    assert samples.dtype == torch.float32 and torch.isfinite(samples).all()


def test_rank_deficient_factors_are_positive_definite_with_the_prior():
    """Fewer tokens than the factor width: the posterior is still PD."""
    model = make_peft_classifier("llama")
    la = Laplace(
        model,
        "classification",
        subset_of_weights="lora",
        hessian_structure="kron",
        lowrank_threshold=None,
    )
    batch = make_batch(2, T=3)  # 6 tokens < hidden width 32
    la.fit(make_loader(batch, batch_size=2))
    blocks = la.H_facs.kfacs
    assert any(torch.linalg.matrix_rank(F) < F.shape[0] for b in blocks for F in b)
    for prior in (1e-8, 1.0, 1e8):
        la.prior_precision = prior
        P = la.posterior_precision.to_matrix()
        assert torch.linalg.eigvalsh(P).min() > 0
        assert torch.isfinite(la.log_marginal_likelihood())
        probs = la(batch)
        assert torch.isfinite(probs).all()
        assert torch.allclose(probs.sum(-1), torch.ones(2, dtype=probs.dtype))


def test_bf16_feature_jacobian_path_for_many_answers():
    """C > hidden answers through a frozen lm_head (features route) in bf16."""
    from helpers import make_lm
    from peft import LoraConfig, get_peft_model

    from laplace_lora_backend.llm import AnswerTokenClassifier

    lm, targets = make_lm("llama")  # hidden 32, vocabulary 40
    peft_lm = get_peft_model(lm, LoraConfig(r=4, target_modules=targets))
    model32 = AnswerTokenClassifier(peft_lm, list(range(36))).float().eval()
    assert model32.linear_head()[0].shape == (36, 32)  # more answers than hidden
    model16 = copy.deepcopy(model32).to(torch.bfloat16)
    batch = make_batch(4, T=6, seed=3, n_out=36)
    probs = []
    for model in (model32, model16):
        la = Laplace(
            model, "classification", subset_of_weights="lora", hessian_structure="kron"
        )
        la.fit(make_loader(make_batch(8, T=6, n_out=36), batch_size=4))
        probs.append(la(batch))
    assert probs[1].dtype == torch.float32 and torch.isfinite(probs[1]).all()
    assert (probs[1] - probs[0]).abs().max() < 2e-2


@pytest.mark.parametrize("backend_kwargs", [{"stochastic": True}, {}])
def test_bf16_regression(backend_kwargs):
    """bf16 regression with float32 targets, MC Fisher and exact GGN."""
    model = make_peft_classifier("llama", n_out=2).to(torch.bfloat16)
    batch = make_batch(6, T=5, n_out=2) | {"labels": torch.randn(6, 2)}
    for structure in ("kron", "diag"):
        la = Laplace(
            model,
            "regression",
            subset_of_weights="lora",
            hessian_structure=structure,
            backend_kwargs=backend_kwargs,
        )
        la.fit(make_loader(batch))
        assert torch.isfinite(la.log_marginal_likelihood())
        mean, var = la(batch)
        assert torch.isfinite(mean).all() and (var.diagonal(dim1=1, dim2=2) > 0).all()
