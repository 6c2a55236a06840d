"""("lora", "kron") with low-rank wide factors, end to end, float64."""

from __future__ import annotations

import io

import pytest
import torch
from helpers import (
    brute_force_jacobians,
    make_batch,
    make_loader,
    make_peft_classifier,
    rel_err,
)
from laplace import Laplace
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader, TensorDataset

import laplace_lora_backend  # noqa: F401
from laplace_lora_backend.matrix import LoRAKron, LowRankFactor
from laplace_lora_backend.matrix.lowrank_options import DEFAULT_LOWRANK_THRESHOLD

PRECS = [1e-2, 1.0, 30.0]


def fit(lowrank_threshold, lowrank_rank=16, residual="trace", arch="llama", **kw):
    model = make_peft_classifier(arch)
    batch = make_batch(n=6, pad=True)
    la = Laplace(
        model,
        "classification",
        subset_of_weights="lora",
        hessian_structure="kron",
        lowrank_threshold=lowrank_threshold,
        lowrank_rank=lowrank_rank,
        lowrank_residual=residual,
        **kw,
    )
    la.fit(make_loader(batch, batch_size=3))
    return la, model, batch


def _wide_lora_model(width: int) -> torch.nn.Module:
    """One LoRA (r=2) linear layer `width -> 3` (a plain torch model)."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(width, 3))
    cfg = LoraConfig(r=2, lora_alpha=2, target_modules=["0"], lora_dropout=0.0)
    return get_peft_model(base, cfg).double()


@pytest.mark.parametrize(
    "width, wide_is_lowrank",
    [(DEFAULT_LOWRANK_THRESHOLD - 1, False), (DEFAULT_LOWRANK_THRESHOLD, True)],
)
def test_default_threshold_rule_at_the_boundary(width, wide_is_lowrank):
    """Library defaults: a factor of side `d` is low-rank iff d >= 1024, the
    measured crossover (below it dense is faster and exact)."""
    assert DEFAULT_LOWRANK_THRESHOLD == 1024
    model = _wide_lora_model(width)
    X = torch.randn(8, width, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    la = Laplace(model, "classification", subset_of_weights="lora")
    assert la.lowrank.threshold == DEFAULT_LOWRANK_THRESHOLD
    la.fit(DataLoader(TensorDataset(X, y), batch_size=4))
    kinds = [[isinstance(F, LowRankFactor) for F in b] for b in la.H_facs.kfacs]
    # lora_A (2, width): factors (2 x 2, width x width); lora_B (3, 2): dense
    assert kinds == [[False, wide_is_lowrank], [False, False]]


def test_none_means_dense_and_a_threshold_compresses_wide_sides():
    la, _, _ = fit(None)
    assert all(isinstance(F, torch.Tensor) for b in la.H_facs.kfacs for F in b)
    la, _, _ = fit(16)
    kinds = [[isinstance(F, LowRankFactor) for F in b] for b in la.H_facs.kfacs]
    # lora_A: (r x r, in x in); lora_B: (out x out, r x r); widths 32 / 16 >= 16
    assert kinds == [[False, True], [True, False]] * 4


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_full_rank_lowrank_equals_dense_path(arch):
    """lowrank_rank >= d: evidence, variance, predictive and samples equal the
    dense path to 1e-6."""
    dense, model, batch = fit(None, arch=arch)
    low, _, _ = fit(16, lowrank_rank=200, arch=arch)
    assert isinstance(low.H_facs, LoRAKron)
    for prec in PRECS:
        p = torch.tensor(prec, dtype=torch.float64)
        a, b = low.log_marginal_likelihood(p), dense.log_marginal_likelihood(p)
        assert abs((a - b) / b) < 1e-6
    Js, _ = low.backend.jacobians(batch)
    assert rel_err(low.functional_variance(Js), dense.functional_variance(Js)) < 1e-6
    assert rel_err(low(batch), dense(batch)) < 1e-6
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert rel_err(low.sample(50, generator=g1), dense.sample(50, generator=g2)) < 1e-6


@pytest.mark.parametrize("residual", ["trace", "none"])
def test_truncated_posterior_against_its_dense_matrix(residual):
    """rank < d: evidence, functional variance (brute-force J) and predictive
    are those of the dense matrix `to_matrix()` of the same posterior."""
    la, model, batch = fit(16, lowrank_rank=3, residual=residual)
    la.prior_precision = 0.8
    P = la.posterior_precision.to_matrix()
    Sigma = torch.linalg.inv(P)
    J, f = brute_force_jacobians(model, la.lora_weights, batch)
    var = la.functional_variance(J)
    assert rel_err(var, torch.einsum("bcp,pq,bkq->bck", J, Sigma, J)) < 1e-6
    Js, _ = la.backend.jacobians(batch)
    assert rel_err(la.functional_variance(Js), var) < 1e-6
    lml = la.log_likelihood - 0.5 * (
        torch.logdet(P)
        - la.n_params * torch.log(torch.tensor(0.8, dtype=P.dtype))
        + 0.8 * la.mean @ la.mean
    )
    assert abs((la.log_marginal_likelihood() - lml) / lml) < 1e-6
    probs = la(batch, link_approx="probit")  # default: probit of zero-sum logits
    C = f.shape[-1]
    Pc = torch.eye(C, dtype=f.dtype) - 1.0 / C
    var_c = Pc @ var @ Pc
    kappa = 1 / torch.sqrt(1 + torch.pi / 8 * torch.diagonal(var_c, dim1=1, dim2=2))
    assert rel_err(probs, torch.softmax((f @ Pc) * kappa, -1)) < 1e-6


def test_marglik_tuning_and_per_layer_prior():
    la, _, batch = fit(16, lowrank_rank=4)
    la.optimize_prior_precision(method="marglik", n_steps=20, prior_structure="scalar")
    assert la.prior_precision.numel() == 1 and la.prior_precision > 0
    la.optimize_prior_precision(
        method="marglik", n_steps=20, prior_structure="layerwise"
    )
    assert la.prior_precision.numel() == la.n_layers
    assert torch.isfinite(la.log_marginal_likelihood())
    assert torch.isfinite(la(batch)).all()


def test_state_dict_round_trip_with_weights_only_load():
    la, model, batch = fit(16, lowrank_rank=4)
    buf = io.BytesIO()
    torch.save(la.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    la2 = Laplace(
        model,
        "classification",
        subset_of_weights="lora",
        hessian_structure="kron",
        lowrank_threshold=16,
        lowrank_rank=4,
    )
    la2.load_state_dict(state)
    assert isinstance(la2.H_facs.kfacs[0][1], LowRankFactor)
    assert torch.equal(la2.log_marginal_likelihood(), la.log_marginal_likelihood())
    assert torch.equal(la2(batch), la(batch))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lowrank_rank": 0}, "lowrank_rank"),
        ({"lowrank_threshold": 4}, "above the LoRA rank"),
        ({"lowrank_residual": "drop"}, "'trace'"),
    ],
)
def test_bad_lowrank_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Laplace(
            make_peft_classifier("llama"),
            "classification",
            subset_of_weights="lora",
            hessian_structure="kron",
            **kwargs,
        )


def test_no_curvature_is_allocated_for_non_lora_parameters(monkeypatch):
    """laplace-torch's __init__ would allocate zero curvature for every
    parameter that requires grad (a d x d factor for a wide LoRA weight, P x P
    for a full model): ours defers it until the LoRA weights are known."""
    from laplace import FullLaplace
    from laplace.utils import Kron

    def refuse(*args, **kwargs):
        raise AssertionError("dense Kron.init_from_model was called")

    monkeypatch.setattr(Kron, "init_from_model", refuse)
    la, _, _ = fit(16, lowrank_rank=4)
    assert la.H_facs is not None

    model = make_peft_classifier("llama")
    model.requires_grad_(True)  # base weights trainable too
    sizes = []
    original = FullLaplace._init_H

    def spy(self):
        original(self)
        sizes.append(None if self.H is None else tuple(self.H.shape))

    monkeypatch.setattr(FullLaplace, "_init_H", spy)
    la = Laplace(
        model, "classification", subset_of_weights="lora", hessian_structure="full"
    )
    assert sizes == [(la.n_params, la.n_params)]
