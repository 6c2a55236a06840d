"""("lora", *) Laplace classes against laplace-torch's own classes and dense
brute-force references, in float64."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    brute_force_ggn,
    make_batch,
    make_loader,
    make_peft_classifier,
    rel_err,
)
from laplace import KronLaplace, Laplace
from laplace.curvature import CurvlinopsEF, CurvlinopsGGN

import laplace_lora_backend  # noqa: F401  (registers the "lora" keys)
from laplace_lora_backend import (
    LoRADiagLaplace,
    LoRAEF,
    LoRAFullLaplace,
    LoRAGGN,
    LoRAKronLaplace,
)

TOL = 1e-5  # the acceptance bound; observed errors are ~1e-12
PRIOR_PRECISIONS = [1e-2, 1.0, 30.0]


def fit_pair(arch, ours, ref, approx, pad=False):
    model = make_peft_classifier(arch)
    batch = make_batch(n=6, pad=pad)
    loader = make_loader(batch, batch_size=3)
    la = Laplace(
        model,
        "classification",
        subset_of_weights="lora",
        hessian_structure="kron",
        backend=ours,
        backend_kwargs={"kfac_approx": approx},
        center_logits=False,  # laplace-torch's probit, compared below
    )
    la.fit(loader)
    up = KronLaplace(
        model, "classification", backend=ref, asdl_fisher_kwargs={"kfac_approx": approx}
    )
    up.fit(loader)
    return la, up, batch


@pytest.mark.parametrize(
    "ours, ref", [(LoRAGGN, CurvlinopsGGN), (LoRAEF, CurvlinopsEF)], ids=["GGN", "EF"]
)
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_kron_laplace_equals_upstream(arch, ours, ref, approx):
    """Factors, evidence at several prior precisions, functional variance and
    the probit predictive equal laplace-torch's KronLaplace + Curvlinops."""
    la, up, batch = fit_pair(arch, ours, ref, approx)
    assert isinstance(la, LoRAKronLaplace)
    assert la.n_params == up.n_params
    assert torch.equal(la.mean, up.mean)
    for Fo, Fr in zip(la.H_facs.kfacs, up.H_facs.kfacs, strict=True):
        for a, b in zip(Fo, Fr, strict=True):
            assert rel_err(a, b) < TOL
    for prec in PRIOR_PRECISIONS:
        lml_o = la.log_marginal_likelihood(torch.tensor(prec, dtype=torch.float64))
        lml_r = up.log_marginal_likelihood(torch.tensor(prec, dtype=torch.float64))
        assert abs((lml_o - lml_r) / lml_r) < TOL
    per_layer = torch.linspace(0.5, 2.0, la.n_layers, dtype=torch.float64)
    assert (
        rel_err(
            la.log_marginal_likelihood(per_layer), up.log_marginal_likelihood(per_layer)
        )
        < TOL
    )
    la.prior_precision = up.prior_precision = 0.7
    Js, f = la.backend.jacobians(batch)
    assert rel_err(la.functional_variance(Js), up.functional_variance(Js)) < TOL
    p_o = la(batch, pred_type="glm", link_approx="probit")
    p_r = up(batch, pred_type="glm", link_approx="probit")
    assert rel_err(p_o, p_r) < TOL
    assert torch.allclose(p_o.sum(-1), torch.ones(6, dtype=torch.float64))


def test_marglik_tuning_runs_and_matches_upstream():
    """optimize_prior_precision(method='marglik') with laplace-torch's scalar
    prior structure (ours defaults to 'lora') finds the same prior."""
    la, up, _ = fit_pair("llama", LoRAGGN, CurvlinopsGGN, "expand")
    la.optimize_prior_precision(
        method="marglik", n_steps=30, prior_structure="scalar", trust_region=None
    )
    up.optimize_prior_precision(method="marglik", n_steps=30)
    assert rel_err(la.prior_precision, up.prior_precision) < 1e-4


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_full_equals_brute_force_ggn_and_diag_its_diagonal(likelihood):
    """("lora","full") is the dense GGN J^T H J (torch.func); ("lora","diag")
    its diagonal; both with left padding and two batches."""
    n_out = 3 if likelihood == "classification" else 2
    model = make_peft_classifier("llama", n_out=n_out)
    batch = make_batch(n=6, pad=True, n_out=n_out)
    if likelihood == "regression":
        batch["labels"] = torch.randn(6, 2, dtype=torch.float64)
    loader = make_loader(batch, batch_size=3)
    full = Laplace(
        model, likelihood, subset_of_weights="lora", hessian_structure="full"
    )
    full.fit(loader)
    diag = Laplace(
        model, likelihood, subset_of_weights="lora", hessian_structure="diag"
    )
    diag.fit(loader)
    assert isinstance(full, LoRAFullLaplace) and isinstance(diag, LoRADiagLaplace)
    H = brute_force_ggn(model, full.backend.lora_weights, batch, likelihood)
    assert rel_err(full.H, H) < 1e-6  # float32 RMSNorm inside HF models
    assert rel_err(diag.H, torch.diagonal(H)) < 1e-6
    f = model(batch)
    if likelihood == "classification":
        loss = torch.nn.functional.cross_entropy(f, batch["labels"], reduction="sum")
    else:
        loss = 0.5 * ((f - batch["labels"]) ** 2).sum()
    assert torch.allclose(full.loss, loss.detach()) and torch.allclose(
        diag.loss, full.loss
    )


def test_ef_full_and_diag_use_per_example_gradients():
    """EF diag/full equal sum_n g_n g_n^T of brute-force per-example grads."""
    model = make_peft_classifier("gpt2")
    batch = make_batch(n=4, pad=True)
    loader = make_loader(batch, batch_size=2)
    full = Laplace(
        model,
        "classification",
        subset_of_weights="lora",
        hessian_structure="full",
        backend=LoRAEF,
    )
    full.fit(loader)
    Gs, _ = full.backend.gradients(batch, batch["labels"])
    assert rel_err(full.H, Gs.T @ Gs) < 1e-12


def kron_fit(model, batch, batch_size, N=None):
    la = Laplace(
        model, "classification", subset_of_weights="lora", hessian_structure="kron"
    )
    la.fit(make_loader(batch, batch_size))
    return la.H_facs


def test_batch_split_invariance():
    """One batch of 6 or batches of 2 give the same summed curvature."""
    model = make_peft_classifier("llama")
    batch = make_batch(n=6, pad=True)
    k6, k2 = kron_fit(model, batch, 6), kron_fit(model, batch, 2)
    for Fa, Fb in zip(k6.kfacs, k2.kfacs, strict=True):
        for a, b in zip(Fa, Fb, strict=True):
            assert rel_err(a, b) < 1e-12


def test_n_copies_of_one_point_is_n_times_one_point():
    """N copies of one example with N data give N x the one-point curvature
    (laplace-torch's invariant)."""
    model = make_peft_classifier("llama")
    one = make_batch(n=1, pad=False)
    copies = {k: v.repeat(5, *([1] * (v.ndim - 1))) for k, v in one.items()}
    k1, k5 = kron_fit(model, one, 1), kron_fit(model, copies, 5)
    for Fa, Fb in zip(k1.kfacs, k5.kfacs, strict=True):
        # summed output factor scales by 5, averaged input factor stays
        assert rel_err(Fb[0], 5 * Fa[0]) < 1e-12
        assert rel_err(Fb[1], Fa[1]) < 1e-12


def test_lora_modules_selects_lm_head_for_llla():
    """lora_modules=['lm_head'] fits and predicts over lm_head's LoRA only."""
    model = make_peft_classifier("llama", targets=["q_proj", "v_proj", "lm_head"])
    batch = make_batch()
    la = Laplace(
        model,
        "classification",
        subset_of_weights="lora",
        hessian_structure="kron",
        lora_modules=["lm_head"],
    )
    la.fit(make_loader(batch))
    assert la.n_layers == 2 and all("lm_head" in w.name for w in la.lora_weights)
    la.optimize_prior_precision(method="marglik", n_steps=10)
    probs = la(batch, link_approx="probit")
    assert probs.shape == (6, 3) and torch.isfinite(probs).all()


def test_frozen_base_with_other_trainable_weights():
    """Trainable non-LoRA weights are ignored by ours; upstream backends on
    them are refused with a message that names the fix."""
    model = make_peft_classifier("llama")
    model.lm.base_model.model.lm_head.weight.requires_grad_(True)
    batch = make_batch()
    la = Laplace(
        model, "classification", subset_of_weights="lora", hessian_structure="kron"
    )
    la.fit(make_loader(batch))
    assert la.n_params == sum(w.param.numel() for w in la.lora_weights)
    bad = Laplace(
        model,
        "classification",
        subset_of_weights="lora",
        hessian_structure="kron",
        backend=CurvlinopsGGN,
    )
    with pytest.raises(ValueError, match="LoRA backend"):
        bad.fit(make_loader(batch))


def test_our_backend_works_for_upstream_kron_laplace():
    """backend=LoRAGGN plugs into laplace-torch's KronLaplace unchanged."""
    model = make_peft_classifier("llama")
    batch = make_batch()
    up = KronLaplace(model, "classification", backend=LoRAGGN)
    up.fit(make_loader(batch))
    la = Laplace(
        model, "classification", subset_of_weights="lora", hessian_structure="kron"
    )
    la.fit(make_loader(batch))
    assert torch.allclose(up.log_marginal_likelihood(), la.log_marginal_likelihood())


def test_prior_precision_per_lora_weight_and_state_dict_round_trip():
    model = make_peft_classifier("llama")
    batch = make_batch()
    la = Laplace(
        model,
        "classification",
        subset_of_weights="lora",
        hessian_structure="kron",
        prior_precision=torch.ones(8),
    )
    la.fit(make_loader(batch))
    lml = la.log_marginal_likelihood()
    la2 = Laplace(
        model, "classification", subset_of_weights="lora", hessian_structure="kron"
    )
    la2.load_state_dict(la.state_dict())
    assert torch.allclose(la2.log_marginal_likelihood(), lml)
    with pytest.raises(ValueError, match="prior_precision has 3 values") as err:
        la.prior_precision = torch.ones(3)
    assert "or 8 (one per LoRA weight tensor" in str(err.value)
    assert 'one value per parameter needs hessian_structure="diag"' in str(err.value)
    with pytest.raises(ValueError, match=f"prior_precision has {la.n_params} values"):
        la.prior_precision = torch.ones(la.n_params)
    assert torch.equal(la.prior_precision, torch.ones(8))  # the previous value kept
    diag = Laplace(
        model, "classification", subset_of_weights="lora", hessian_structure="diag"
    )
    with pytest.raises(ValueError, match="prior_precision has 3 values") as err:
        diag.prior_precision = torch.ones(3)
    assert f"or {diag.n_params} (one per parameter)" in str(err.value)
    diag.prior_precision = torch.ones(diag.n_params)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lora_modules": ["o_proj"]}, "q_proj"),
        ({"backend_kwargs": {"kfac_approx": "mean"}}, "'expand'"),
    ],
)
def test_bad_input_raises_value_error_naming_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Laplace(
            make_peft_classifier("llama"),
            "classification",
            subset_of_weights="lora",
            hessian_structure="kron",
            **kwargs,
        )


def test_model_without_lora_raises():
    from helpers import make_lm

    lm, _ = make_lm("llama")
    with pytest.raises(ValueError, match="get_peft_model"):
        Laplace(
            lm, "classification", subset_of_weights="lora", hessian_structure="kron"
        )
