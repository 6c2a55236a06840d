"""laplace-torch's contract, run against our classes and against the host's.

Written from the behaviour laplace-torch's own tests exercise (parametric
classes, the factory, prior precision, unfitted objects, fitting, predictive,
serialization, curvature interface), on small PEFT models whose only trainable
weights are the LoRA weights: the host's classes (``subset_of_weights="all"``
+ `CurvlinopsGGN`) are the control, ours (``subset_of_weights="lora"``) must
behave the same. Deliberate differences are skipped with their reason; the
README lists them.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import make_batch, make_loader, make_peft_classifier, rel_err
from laplace import DiagLaplace, FullLaplace, KronLaplace, Laplace
from laplace.curvature import CurvlinopsGGN

import laplace_lora_backend  # noqa: F401
from laplace_lora_backend import LoRAGGN
from laplace_lora_backend.matrix import LoRAKron

STRUCTURES = ["kron", "diag", "full"]
HOST = {"kron": KronLaplace, "diag": DiagLaplace, "full": FullLaplace}


def make(side: str, structure: str, model=None, **kwargs):
    """Our class or the host's, on the same kind of tiny PEFT model."""
    model = model if model is not None else make_peft_classifier("llama")
    if side == "ours":
        return Laplace(
            model,
            "classification",
            subset_of_weights="lora",
            hessian_structure=structure,
            center_logits=False,  # the host's probit
            **kwargs,
        )
    return HOST[structure](model, "classification", backend=CurvlinopsGGN, **kwargs)


SIDES = ["ours", "host"]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# --------------------------------------------------------------- factory
@pytest.mark.parametrize("structure", STRUCTURES)
def test_factory_returns_the_structure_class(structure):
    la = make("ours", structure)
    assert isinstance(la, HOST[structure])
    assert la._key == ("lora", structure)


# ------------------------------------------------------- prior precision (A1)
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("bad", ["1.5", None, [1.0, 2.0]])
def test_bad_prior_precision_types_raise_value_error(side, bad):
    la = make(side, "kron")
    with pytest.raises(ValueError):
        la.prior_precision = bad
    la.prior_precision = 2.0  # still usable
    assert float(la.prior_precision) == 2.0


@pytest.mark.parametrize("side", SIDES)
def test_prior_precision_scalar_layerwise_and_diag_shapes(side):
    la = make(side, "diag")
    la.prior_precision = 3.0
    assert la.prior_precision.shape == (1,)
    la.prior_precision = torch.ones(la.n_layers)
    assert la.prior_precision_diag.shape == (la.n_params,)
    la.prior_precision = torch.ones(la.n_params)
    assert la.prior_precision_diag.shape == (la.n_params,)
    with pytest.raises(ValueError):
        la.prior_precision = torch.ones(la.n_layers + 1)


# ------------------------------------------------------ unfitted object (A2)
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("structure", STRUCTURES)
def test_log_prob_before_fit_is_the_priors(side, structure):
    la = make(side, structure, prior_precision=2.0)
    v = torch.full((la.n_params,), 0.1, dtype=torch.float64)
    expected = torch.distributions.Normal(0.0, 2.0**-0.5).log_prob(v).sum()
    assert abs(float(la.log_prob(v)) - float(expected)) < 1e-6 * abs(float(expected))


@pytest.mark.parametrize("structure", ["diag", "full"])
def test_unfitted_diag_and_full_predict_with_the_prior(structure):
    x = make_batch(n=3)
    model = make_peft_classifier("llama")
    host = make("host", structure, model)
    ours = make("ours", structure, model)
    with pytest.warns(UserWarning, match="not fitted"):
        p = ours(x)
    assert rel_err(p, host(x)) < 1e-6


@pytest.mark.parametrize("side", SIDES)
def test_unfitted_kron_refuses_to_predict(side):
    with pytest.raises(AttributeError):
        make(side, "kron")(make_batch(n=3))


# ----------------------------------------------------------------- fit (A3)
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("structure", STRUCTURES)
def test_first_fit_with_override_false_is_a_normal_fit(side, structure):
    model = make_peft_classifier("llama")
    loader = make_loader(make_batch(n=6, pad=False))
    a = make(side, structure, model)
    a.fit(loader, override=False)
    b = make(side, structure, model)
    b.fit(loader)
    assert rel_err(a.log_marginal_likelihood(), b.log_marginal_likelihood()) < 1e-10


@pytest.mark.parametrize("structure", STRUCTURES)
def test_online_fit_adds_curvature_like_the_host(structure):
    """fit(a); fit(b, override=False) == the host's on the same batches."""
    model = make_peft_classifier("llama")
    first = make_loader(make_batch(n=3, pad=False, seed=1))
    second = make_loader(make_batch(n=3, pad=False, seed=2))
    out = {}
    for side in SIDES:
        la = make(side, structure, model)
        la.fit(first)
        la.fit(second, override=False)
        out[side] = la.log_marginal_likelihood()
    assert rel_err(out["ours"], out["host"]) < 1e-6


# -------------------------------------------------- batch keys (A4)
@pytest.mark.parametrize("side", SIDES)
def test_dict_batch_without_labels_in_fit_raises_key_error(side):
    batch = make_batch(n=3)
    batch.pop("labels")
    with pytest.raises(KeyError):
        make(side, "kron").fit(make_loader(batch))


# ---------------------------------------------------- nn predictive (A5)
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("structure", ["kron", "diag"])
def test_nn_predictive_with_enable_backprop_keeps_autograd_working(side, structure):
    """Weight sampling with enable_backprop=True must not break autograd (the
    host detaches; ours is differentiable) nor change the LoRA weights."""
    model = make_peft_classifier("llama")
    la = make(side, structure, model, enable_backprop=True)
    la.fit(make_loader(make_batch(n=6, pad=False)))
    before = [p.detach().clone() for p in la.params]
    x = make_batch(n=3, seed=4)
    probs = la(x, pred_type="nn", link_approx="mc", n_samples=3)
    if probs.requires_grad:
        probs.log().sum().backward()
        assert all(p.grad is not None for p in la.params)
    model(x).sum().backward()  # the model still trains
    unchanged = zip(la.params, before, strict=True)
    assert all(torch.equal(p.detach(), b) for p, b in unchanged)
    if side == "ours":
        assert probs.requires_grad


# ------------------------------------------------------- MC samples (A6)
def test_mc_samples_in_asdl_fisher_kwargs_is_honoured():
    model = make_peft_classifier("llama")
    loader = make_loader(make_batch(n=6, pad=False))

    def factors(**kwargs):
        la = Laplace(
            model,
            "classification",
            subset_of_weights="lora",
            hessian_structure="kron",
            backend=LoRAGGN,
            backend_kwargs={"stochastic": True},
            **kwargs,
        )
        torch.manual_seed(0)
        la.fit(loader)
        return torch.cat([F.flatten() for b in la.H_facs.kfacs for F in b])

    one = factors(asdl_fisher_kwargs={"mc_samples": 1})
    many = factors(asdl_fisher_kwargs={"mc_samples": 400})
    assert not torch.allclose(one, many)
    exact = Laplace(
        model, "classification", subset_of_weights="lora", hessian_structure="kron"
    )
    exact.fit(loader)
    ggn = torch.cat([F.flatten() for b in exact.H_facs.kfacs for F in b])
    # 400 sampled labels approach the exact GGN's output factors
    assert rel_err(many, ggn) < rel_err(one, ggn)


# ------------------------------------------------------- predictive, I/O
@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("link", ["probit", "bridge"])
def test_fitted_predictive_and_evidence_equal_the_hosts(structure, link):
    model = make_peft_classifier("llama")
    loader = make_loader(make_batch(n=6, pad=False))
    out = {}
    for side in SIDES:
        la = make(side, structure, model, prior_precision=0.7)
        la.fit(loader)
        probs = la(make_batch(n=4), link_approx=link)
        out[side] = (la.log_marginal_likelihood(), probs)
    assert rel_err(out["ours"][0], out["host"][0]) < 1e-6
    assert rel_err(out["ours"][1], out["host"][1]) < 1e-5


@pytest.mark.parametrize("structure", STRUCTURES)
def test_state_dict_round_trip(structure):
    model = make_peft_classifier("llama")
    la = make("ours", structure, model, prior_precision=0.7)
    la.fit(make_loader(make_batch(n=6)))
    other = make("ours", structure, model)
    other.load_state_dict(la.state_dict())
    x = make_batch(n=3, seed=9)
    assert torch.equal(other(x), la(x))
    assert torch.equal(other.log_marginal_likelihood(), la.log_marginal_likelihood())


@pytest.mark.parametrize("side", SIDES)
def test_marglik_tuning_increases_the_evidence(side):
    la = make(side, "kron")
    la.fit(make_loader(make_batch(n=6, pad=False)))
    before = la.log_marginal_likelihood()
    # laplace-torch's default structure and plain marglik; ours defaults to
    # "lora" with the trust region (README)
    plain = {} if side == "host" else {"trust_region": None}
    la.optimize_prior_precision(
        method="marglik", n_steps=50, prior_structure="scalar", **plain
    )
    assert la.log_marginal_likelihood() >= before


# ---------------------------------------------------- deliberate differences
def test_evidence_before_fit():
    pytest.skip(
        "Deliberate difference: laplace-torch raises a RuntimeError from inside "
        "the evidence before fit; ours raises NotFittedError (ValueError and "
        "AttributeError) that says to call fit."
    )


def test_reward_modelling():
    pytest.skip(
        "Deliberate difference: likelihood='reward_modeling' is refused with a "
        "ValueError naming laplace-torch's own classes."
    )


def test_lora_kron_refuses_a_diagonal_factor():
    with pytest.raises(ValueError, match="square"):
        LoRAKron([[torch.ones(3), torch.eye(2)]])


def test_default_prior_structure():
    pytest.skip(
        "Deliberate difference: optimize_prior_precision() defaults to "
        "prior_structure='lora' (lora_A at its initialisation prior, one marglik "
        "precision for lora_B) checked by a trust region on training examples "
        "(trust_region=2.0), chosen on the calibration battery; "
        "prior_structure='scalar', trust_region=None is laplace-torch's default "
        "(tested above)."
    )
