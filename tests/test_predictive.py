"""GLM and weight-sampling predictives of the LoRA Laplace classes."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    brute_force_jacobians,
    make_batch,
    make_loader,
    make_peft_classifier,
    rel_err,
)
from laplace import KronLaplace, Laplace
from laplace.curvature import CurvlinopsGGN

import laplace_lora_backend  # noqa: F401


@pytest.fixture(scope="module")
def fitted():
    """Ours and laplace-torch's KronLaplace + CurvlinopsGGN on the same data
    (no padding in the fit, so the posteriors are identical)."""
    model = make_peft_classifier("llama")
    train = make_batch(n=6, pad=False)
    ours = Laplace(
        model,
        "classification",
        subset_of_weights="lora",
        hessian_structure="kron",
        prior_precision=0.5,
        center_logits=False,  # laplace-torch's probit, compared below
    )
    ours.fit(make_loader(train))
    ref = KronLaplace(
        model, "classification", backend=CurvlinopsGGN, prior_precision=0.5
    )
    ref.fit(make_loader(train))
    test = make_batch(n=5, pad=True, seed=3)
    return ours, ref, model, test


@pytest.mark.parametrize("link", ["probit", "bridge", "bridge_norm"])
def test_deterministic_links_equal_laplace_torch(fitted, link):
    ours, ref, _, test = fitted
    p_o = ours(test, pred_type="glm", link_approx=link)
    p_r = ref(test, pred_type="glm", link_approx=link)
    assert rel_err(p_o, p_r) < 1e-5
    assert torch.allclose(p_o.sum(-1), torch.ones(5, dtype=torch.float64))


@pytest.mark.parametrize("diagonal_output", [False, True])
def test_mc_link_equals_laplace_torch_with_the_same_samples(fitted, diagonal_output):
    """MC (joint over classes, or independent outputs) averages probabilities;
    with the same global seed both draw the same samples."""
    ours, ref, _, test = fitted
    torch.manual_seed(7)
    p_o = ours(test, link_approx="mc", n_samples=200, diagonal_output=diagonal_output)
    torch.manual_seed(7)
    p_r = ref(test, link_approx="mc", n_samples=200, diagonal_output=diagonal_output)
    assert rel_err(p_o, p_r) < 1e-5


def test_functional_variance_equals_brute_force(fitted):
    """J Sigma J^T with J from torch.func and Sigma from to_matrix()."""
    ours, _, model, test = fitted
    J, _ = brute_force_jacobians(model, ours.lora_weights, test)
    Sigma = torch.linalg.inv(ours.posterior_precision.to_matrix())
    Js, _ = ours.backend.jacobians(test)
    ref = torch.einsum("bcp,pq,bkq->bck", J, Sigma, J)
    assert rel_err(ours.functional_variance(Js), ref) < 1e-6


def test_joint_covariance_has_the_marginals_on_its_diagonal_blocks(fitted):
    ours, _, _, test = fitted
    Js, _ = ours.backend.jacobians(test)
    cov = ours.functional_covariance(Js)
    assert cov.shape == (15, 15)
    var = ours.functional_variance(Js)
    for b in range(5):
        assert rel_err(cov[3 * b : 3 * b + 3, 3 * b : 3 * b + 3], var[b]) < 1e-10


def test_jacobian_chunks_do_not_change_the_result():
    """Chunking the outputs bounds memory for large C without changing J."""
    model = make_peft_classifier("llama", n_out=7)
    batch = make_batch(pad=True, n_out=7)
    la = Laplace(
        model, "classification", subset_of_weights="lora", hessian_structure="kron"
    )
    J_all, f = la.backend.jacobians(batch)
    la.backend.jacobian_chunk_size = 2
    J_chunked, _ = la.backend.jacobians(batch)
    assert J_all.shape == (6, 7, la.n_params)
    assert rel_err(J_chunked, J_all) < 1e-12
    J_ref, _ = brute_force_jacobians(model, la.lora_weights, batch)
    assert rel_err(J_all, J_ref) < 1e-10


def test_nn_predictive_restores_weights_bit_for_bit(fitted):
    ours, _, model, test = fitted
    before = [p.detach().clone() for p in ours.params]
    ptrs = [p.data_ptr() for p in ours.params]
    probs = ours(test, pred_type="nn", link_approx="mc", n_samples=20)
    assert torch.allclose(probs.sum(-1), torch.ones(5, dtype=torch.float64))
    samples = ours.predictive_samples(test, pred_type="nn", n_samples=4)
    assert samples.shape == (4, 5, 3)
    assert all(torch.equal(p, b) for p, b in zip(ours.params, before, strict=True))
    assert [p.data_ptr() for p in ours.params] == ptrs
    # the samples really differ from the MAP
    with torch.no_grad():
        assert not torch.allclose(samples[0], model(test).softmax(-1))


def test_nn_predictive_restores_weights_after_an_exception(fitted):
    ours, _, model, test = fitted
    before = [p.detach().clone() for p in ours.params]
    calls = {"n": 0}

    def boom(module, args, output):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")

    handle = model.register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            ours(test, pred_type="nn", link_approx="mc", n_samples=10)
    finally:
        handle.remove()
    assert all(torch.equal(p, b) for p, b in zip(ours.params, before, strict=True))


def test_many_answers_use_feature_jacobians_with_identical_results():
    """C > hidden with a frozen lm_head: Jacobians of the hidden features and
    W Cov W^T give the same predictive as Jacobians of the C outputs."""
    from helpers import make_lm
    from peft import LoraConfig, get_peft_model

    from laplace_lora_backend.llm import AnswerTokenClassifier

    lm, targets = make_lm("llama")
    peft_lm = get_peft_model(lm.double(), LoraConfig(r=4, target_modules=targets))
    with torch.no_grad():
        for n, p in peft_lm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    model = AnswerTokenClassifier(peft_lm, list(range(35))).eval()  # 35 > 32
    train = make_batch(n=6, pad=True, n_out=35)
    la = Laplace(
        model,
        "classification",
        subset_of_weights="lora",
        hessian_structure="kron",
        prior_precision=0.5,
    )
    la.fit(make_loader(train))
    test = make_batch(n=4, pad=True, seed=5, n_out=35)
    calls = []
    original = la.backend.jacobians

    def spy(x, enable_backprop=False, features=False):
        calls.append(features)
        return original(x, enable_backprop, features)

    la.backend.jacobians = spy
    mu, var = la._glm_predictive_distribution(test)
    p_feat = la(test, link_approx="probit")
    model.linear_head = lambda: None  # force the direct C-output path
    mu_ref, var_ref = la._glm_predictive_distribution(test)
    assert calls == [True, True, False]
    assert var.shape == (4, 35, 35)
    # HF's RMSNorm runs in float32 even in a float64 model, so VJPs with
    # different cotangents agree to float32 rounding only (~1e-7 here).
    assert rel_err(mu, mu_ref) < 1e-10 and rel_err(var, var_ref) < 1e-6
    assert rel_err(p_feat, la(test, link_approx="probit")) < 1e-6
