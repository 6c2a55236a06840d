"""Cached-Jacobian predictives, the centered probit and the prior modes."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from helpers import make_batch, make_loader, make_peft_classifier, rel_err
from laplace import KronLaplace, Laplace
from laplace.curvature import CurvlinopsGGN

import laplace_lora_backend  # noqa: F401
from laplace_lora_backend.glm import center_logits, jacobian_batches, probit
from laplace_lora_backend.prior_validation import POSTERIOR_OFF, nll


def _fitted(structure="kron", prior=1.0, **kwargs):
    model = make_peft_classifier("llama")
    la = Laplace(
        model,
        "classification",
        subset_of_weights="lora",
        hessian_structure=structure,
        prior_precision=prior,
        **kwargs,
    )
    la.fit(make_loader(make_batch(n=9, pad=True)))
    return la, model


@pytest.fixture(scope="module")
def kron():
    return _fitted("kron")


@pytest.mark.parametrize("structure", ["kron", "diag", "full"])
@pytest.mark.parametrize("link", ["probit", "bridge", "bridge_norm", "mc"])
@pytest.mark.parametrize("center", [True, False])
def test_cached_jacobians_equal_the_uncached_predictive(structure, link, center):
    """la(la.jacobian_batch(x)) == la(x) for every link, also after the prior
    precision changed between caching and predicting."""
    la, _ = _fitted(structure, center_logits=center)
    x = make_batch(n=5, pad=True, seed=4)
    jb = la.jacobian_batch(x)
    for prior in (0.3, 7.0):
        la.prior_precision = prior
        torch.manual_seed(1)
        cached = la(jb, link_approx=link, n_samples=50)
        torch.manual_seed(1)
        direct = la(x, link_approx=link, n_samples=50)
        assert rel_err(cached, direct) < 1e-6


def test_uncentered_probit_is_laplace_torchs(kron):
    """center_logits=False gives laplace-torch's probit (KronLaplace +
    CurvlinopsGGN on the same unpadded data)."""
    model = make_peft_classifier("llama")
    train = make_batch(n=6, pad=False)
    ours = Laplace(
        model,
        "classification",
        subset_of_weights="lora",
        hessian_structure="kron",
        prior_precision=0.5,
        center_logits=False,
    )
    ours.fit(make_loader(train))
    ref = KronLaplace(
        model, "classification", backend=CurvlinopsGGN, prior_precision=0.5
    )
    ref.fit(make_loader(train))
    test = make_batch(n=5, pad=True, seed=3)
    assert rel_err(ours(test), ref(test)) < 1e-5


def test_centered_probit_is_probit_of_the_zero_sum_gaussian(kron):
    la, _ = kron
    x = make_batch(n=5, pad=True, seed=4)
    mu, var = la._glm_predictive_distribution(x)
    P = torch.eye(3, dtype=mu.dtype) - 1 / 3
    kappa = 1 / torch.sqrt(1 + math.pi / 8 * (P @ var @ P).diagonal(dim1=1, dim2=2))
    expected = torch.softmax(kappa * (mu @ P), -1)
    assert rel_err(la(x), expected) < 1e-10
    # the same distribution over probabilities: MC on centered == MC on raw
    mc, vc = center_logits(mu, var)
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(4000, 5, 3, generator=g, dtype=mu.dtype)
    jitter = 1e-9 * torch.eye(3, dtype=mu.dtype)

    def mc_probs(m, v):
        L = torch.linalg.cholesky(v + jitter)
        return (m + torch.einsum("sbj,bij->sbi", eps, L)).softmax(-1).mean(0)

    raw = mc_probs(mu, var)
    cen = mc_probs(mc, vc + 1 / 3)
    # (adding a constant to the covariance only adds a shared logit offset)
    assert (raw - cen).abs().max() < 0.03


def test_a_variance_shared_by_every_logit_does_not_change_the_centered_probit():
    """Softmax ignores a shift of all logits, so a common-mode variance must
    leave the predictive at MAP's: the centered probit does (as Monte Carlo
    does); laplace-torch's probit flattens large logits towards uniform."""
    mu = torch.tensor([[20.0, 19.0, 5.0]], dtype=torch.float64)
    var = torch.full((1, 3, 3), 100.0, dtype=torch.float64)
    var = var + 1e-4 * torch.eye(3, dtype=torch.float64)
    map_probs = mu.softmax(-1)
    assert rel_err(probit(mu, var, centered=True), map_probs) < 1e-4
    assert (probit(mu, var, centered=False) - map_probs).abs().max() > 0.2
    g = torch.Generator().manual_seed(0)
    L = torch.linalg.cholesky(var[0])
    f = mu + torch.randn(20000, 3, generator=g, dtype=torch.float64) @ L.T
    assert rel_err(f.softmax(-1).mean(0, keepdim=True), map_probs) < 1e-3


def _brute_force_grid(la, val_batch, grid):
    losses = []
    for p in grid:
        la.prior_precision = p
        probs = la(val_batch)
        losses.append(float(nll(probs, val_batch["labels"])))
    return losses


def test_cached_gridsearch_picks_the_brute_force_choice(kron):
    la, _ = kron
    val = make_batch(n=8, pad=True, seed=11)
    la.optimize_prior_precision(
        method="gridsearch",
        val_loader=make_loader(val, batch_size=3),
        log_prior_prec_min=-3,
        log_prior_prec_max=3,
        grid_size=13,
    )
    grid = torch.logspace(-3, 3, 13)
    losses = _brute_force_grid(la, val, grid)
    best = grid[min(range(13), key=losses.__getitem__)]
    la.optimize_prior_precision(
        method="gridsearch",
        val_loader=make_loader(val, batch_size=3),
        log_prior_prec_min=-3,
        log_prior_prec_max=3,
        grid_size=13,
    )
    assert torch.allclose(la.prior_precision, best.to(la.prior_precision))


def test_auto_keeps_marglik_when_it_beats_map_on_validation():
    la, model = _fitted("kron")
    val = make_batch(n=9, pad=True, seed=21)
    with torch.no_grad():  # labels the MAP model gets wrong: variance helps
        val["labels"] = model(val).argmin(-1)
    la.optimize_prior_precision(method="auto", val_loader=make_loader(val))
    choice = la.prior_choice
    assert choice.method in ("marglik", "gridsearch")
    assert choice.val_loss <= choice.val_loss_map
    if choice.method == "marglik":
        la2, _ = _fitted("kron")
        la2.optimize_prior_precision()
        assert torch.allclose(la.prior_precision, la2.prior_precision)


def test_auto_falls_back_to_map_when_no_prior_helps():
    """Validation labels = MAP's own predictions: any variance hurts, so the
    guard switches the posterior off, warns, and predicts like MAP."""
    la, model = _fitted("kron", prior=1.0)
    val = make_batch(n=9, pad=True, seed=22)
    with torch.no_grad():
        val["labels"] = model(val).argmax(-1)
    with pytest.warns(UserWarning, match="switched off"):
        la.optimize_prior_precision(method="auto", val_loader=make_loader(val))
    assert la.prior_choice.method == "map"
    assert torch.all(la.prior_precision == POSTERIOR_OFF)
    x = make_batch(n=4, seed=5)
    with torch.no_grad():
        map_probs = model(x).softmax(-1)
    assert rel_err(la(x), map_probs) < 1e-5


def test_auto_and_gridsearch_need_validation_data(kron):
    la, _ = kron
    for method in ("auto", "gridsearch"):
        with pytest.raises(ValueError, match="val_loader"):
            la.optimize_prior_precision(method=method)
    with pytest.raises(ValueError, match="Unknown method"):
        la.optimize_prior_precision(method="cv")


def test_layerwise_prior_has_one_precision_per_lora_tensor(kron):
    la, _ = kron
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la.optimize_prior_precision(prior_structure="layerwise")
    assert la.prior_precision.shape == (len(la.lora_weights),)
    assert bool((la.prior_precision > 0).all())


def test_jacobian_batches_need_labels(kron):
    la, _ = kron
    batch = make_batch(n=3)
    batch.pop("labels")
    with pytest.raises(ValueError, match="labels"):
        jacobian_batches(la, [batch])


def test_center_logits_is_saved_and_loaded(tmp_path):
    from laplace_lora_backend import LoRAKronLaplace

    la, model = _fitted("kron", center_logits=False)
    la.save_pretrained(tmp_path)
    loaded = LoRAKronLaplace.from_pretrained(tmp_path, model)
    assert loaded.center_logits is False
    x = make_batch(n=4, seed=6)
    assert torch.equal(loaded(x), la(x))


def test_lora_prior_fixes_lora_A_at_its_initialisation_and_tunes_B(kron):
    """prior_structure='lora': lora_A precision 3 * in_features (PEFT's
    Kaiming-uniform variance), one marglik precision for every lora_B."""
    la, _ = kron
    la.optimize_prior_precision(prior_structure="lora")
    prior = la.prior_precision
    assert prior.shape == (la.n_layers,)
    for w, p in zip(la.lora_weights, prior, strict=True):
        if w.kind == "A":
            assert float(p) == 3.0 * w.in_features
    pairs = zip(la.lora_weights, prior, strict=True)
    b = torch.stack([p for w, p in pairs if w.kind == "B"])
    assert torch.allclose(b, b[0].expand_as(b))
    # the tuned B precision maximises the evidence along its own direction
    is_b = torch.tensor([w.kind == "B" for w in la.lora_weights])
    lml = la.log_marginal_likelihood(prior_precision=prior)
    for factor in (0.8, 1.25):
        moved = torch.where(is_b, prior * factor, prior)
        assert la.log_marginal_likelihood(prior_precision=moved) < lml


def test_lora_prior_follows_peft_initialisation():
    from helpers import LastTokenHead, make_lm
    from peft import LoraConfig, get_peft_model

    from laplace_lora_backend.curvature.discovery import find_lora_weights, lora_init
    from laplace_lora_backend.prior_groups import lora_prior_groups

    lm, targets = make_lm("llama")
    cfg = LoraConfig(r=4, target_modules=targets, init_lora_weights="gaussian")
    model = LastTokenHead(get_peft_model(lm, cfg))
    assert lora_init(model, "default") == "gaussian"
    weights = find_lora_weights(model)
    groups, fixed = lora_prior_groups(weights, "gaussian")
    for w, g, f in zip(weights, groups, fixed, strict=True):
        if w.kind == "A":
            assert float(f) == 16.0  # r ** 2: std 1 / r
        else:
            assert torch.isnan(f) and int(g) == 0
    _, fixed = lora_prior_groups(weights, "pissa")  # data-dependent: tuned
    assert torch.isnan(fixed).all()
    assert lora_init(torch.nn.Linear(2, 2), "default") is None


def test_marglik_warns_when_the_training_loss_is_near_zero():
    """A saturated classifier (loss ~0) has ~zero curvature: plain marglik
    cannot set the prior and says so; a normal fit does not warn, nor does
    the default, whose trust region checks the prior on training examples
    (tests/test_trust_region.py)."""
    la, _ = _fitted("kron")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no saturation warning here
        la.optimize_prior_precision(n_steps=5, trust_region=None)
    la.loss = torch.tensor(1e-5) * la.n_data
    with pytest.warns(UserWarning, match="saturated.*method='auto'"):
        la.optimize_prior_precision(n_steps=5, trust_region=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        la.optimize_prior_precision(n_steps=5)
    assert la.trust_region.n_examples == 9


def test_map_loss_reads_through_a_linear_head():
    """MAP's validation loss for feature Jacobians of a linear head (C > hidden)
    is the NLL of softmax(h W^T + b)."""
    from laplace_lora_backend.glm import JacobianBatch
    from laplace_lora_backend.prior_validation import map_loss

    g = torch.Generator().manual_seed(0)
    h = torch.randn(4, 3, generator=g, dtype=torch.float64)
    W = torch.randn(7, 3, generator=g, dtype=torch.float64)
    b = torch.randn(7, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 3, 6, 2])
    jb = JacobianBatch(torch.zeros(4, 3, 5, dtype=torch.float64), h, (W, b))
    expected = float(nll(torch.softmax(h @ W.T + b, -1), y))
    assert map_loss([(jb, y)], "classification") == pytest.approx(expected)
