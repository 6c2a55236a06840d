"""Next-token predictive over the whole vocabulary at every position.

Tiny random Llama (vocabulary 64, eager attention) with LoRA on q and v,
posterior fitted on its next-token loss (K-FAC, EF). References:

- sampling: the same posterior samples (same seed), put into the model by
  `torch.func.functional_call` (the model is never modified there);
- linearised: the dense Jacobian of all `batch x tokens x V` logits w.r.t.
  the LoRA weights (`torch.func.jacrev`), the dense posterior covariance, and
  the exact GLM predictive ``E softmax(f*, J Sigma J^T)`` by Monte Carlo over
  the Gaussian of the logits.
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    lm_laplace,
    make_lm_batch,
    make_loader,
    make_peft_causal_lm,
    make_peft_classifier,
    rel_err,
)
from laplace import Laplace

from laplace_lora_backend import attention, hf_models


@pytest.fixture(scope="module")
def fitted():
    model = make_peft_causal_lm()
    train = make_lm_batch(n=6, T=6, seed=1)
    la = lm_laplace(model, prior_precision=4.0)
    la.fit(make_loader(train, batch_size=3))
    test = make_lm_batch(n=2, T=4, seed=2)
    return la, test


def _weights(la, vector):
    chunks = vector.split([p.numel() for p in la.params])
    return {
        w.name: c.view_as(w.param) for w, c in zip(la.lora_weights, chunks, strict=True)
    }


def test_sampling_predictive_equals_explicit_weight_samples(fitted):
    la, x = fitted
    before = [p.detach().clone() for p in la.params]
    K = 5
    got = la.next_token_predictive(
        x, "nn", n_samples=K, generator=torch.Generator().manual_seed(3)
    )
    samples = la.sample(K, torch.Generator().manual_seed(3))
    with torch.no_grad():
        probs = torch.stack(
            [
                torch.func.functional_call(la.model, _weights(la, s), (x,)).softmax(-1)
                for s in samples
            ]
        )
    mean = probs.mean(0)
    assert got.probs.shape == (2, 4, 64)
    assert rel_err(got.probs, mean) < 1e-12
    H = lambda p: -(p * p.log()).sum(-1)  # noqa: E731
    assert rel_err(got.entropy, H(mean)) < 1e-12
    assert rel_err(got.mutual_information, H(mean) - H(probs).mean(0)) < 1e-10
    assert (got.mutual_information > 0).all()
    for p, b in zip(la.params, before, strict=True):
        assert torch.equal(p, b)  # MAP weights restored bit for bit


def _dense_jacobian(la, x):
    """`(batch, tokens, V, P)` Jacobian of all logits and the MAP logits."""
    params = {w.name: w.param.detach() for w in la.lora_weights}

    def f(p):
        return torch.func.functional_call(la.model, p, (x,))

    jac = torch.func.jacrev(f)(params)
    with torch.no_grad():
        out = f(params)
    return torch.cat([jac[w.name].flatten(3) for w in la.lora_weights], -1), out


def test_jvp_along_a_direction_equals_dense_jacobian_times_it(fitted):
    la, x = fitted
    J, f_map = _dense_jacobian(la, x)
    delta = torch.randn(la.n_params, generator=torch.Generator().manual_seed(0))
    f, jvp = la.logits_and_jvp(x, delta.double())
    assert rel_err(f, f_map) < 1e-12
    # forward vs reverse mode through Llama's RMSNorm, which computes in
    # float32 even for a float64 model: agreement to float32 precision
    assert rel_err(jvp, J @ delta.double()) < 1e-6
    # several directions in one vectorised JVP
    deltas = torch.randn(3, la.n_params, generator=torch.Generator().manual_seed(1))
    f3, jvps = la.logits_and_jvp(x, deltas.double())
    assert jvps.shape == (3, 2, 4, 64)
    assert rel_err(f3, f_map) < 1e-12
    assert rel_err(jvps, torch.einsum("btvp,cp->cbtv", J, deltas.double())) < 1e-6


def test_chunked_linearised_predictive_equals_one_direction_at_a_time(fitted):
    la, x = fitted
    one, chunked = (
        la.next_token_predictive(
            x, "glm", 6, generator=torch.Generator().manual_seed(0), chunk_size=c
        )
        for c in (1, 4)
    )
    assert rel_err(chunked.probs, one.probs) < 1e-6
    assert rel_err(chunked.mutual_information, one.mutual_information) < 1e-5


@pytest.mark.parametrize(
    "arch, targets, split",
    [
        ("llama", None, True),  # decoder + linear head: the decoder is linearised
        ("gpt2", None, True),
        ("llama", ["q_proj", "v_proj", "lm_head"], False),  # LoRA on the head
        ("gemma2-softcap", None, False),  # the logits are post-processed
    ],
)
def test_linearised_predictive_is_the_average_over_jacobian_draws(arch, targets, split):
    """``mean_k softmax(f* + J delta_k)`` with the same posterior draws and the
    dense Jacobian, whichever way the model is linearised."""
    model = make_peft_causal_lm(arch=arch, targets=targets)
    la = lm_laplace(model, prior_precision=4.0)
    la.fit(make_loader(make_lm_batch(n=6, T=6, seed=1), batch_size=3))
    x = make_lm_batch(n=2, T=4, seed=2)
    assert (la.decoder_head_split(x) is not None) is split
    K = 5
    got = la.next_token_predictive(
        x, "glm", n_samples=K, generator=torch.Generator().manual_seed(7)
    )
    J, f_map = _dense_jacobian(la, x)
    deltas = la.sample(K, torch.Generator().manual_seed(7)) - la.mean
    probs = torch.stack([(f_map + J @ d.to(J.dtype)).softmax(-1) for d in deltas]).mean(
        0
    )
    # forward vs reverse mode through RMSNorm's float32 computation
    assert rel_err(got.probs, probs) < 1e-6


def _spy_on_jvps(la, monkeypatch) -> list[int]:
    """Directions of each `logits_and_jvp` call of `la`'s class, in order."""
    calls = []
    original = type(la).logits_and_jvp

    def spy(self, x, directions, split=None):
        calls.append(directions.shape[0])
        return original(self, x, directions, split)

    monkeypatch.setattr(type(la), "logits_and_jvp", spy)
    return calls


def test_tangent_attention_takes_every_direction_in_one_jvp(fitted, monkeypatch):
    """Its memory is bounded by row blocks (test_tangent_attention), so the
    default pushes all K directions at once, even where the eager
    attention's bound would split them."""
    la, x = fitted
    assert la.jvp_attention(x) == attention.ATTENTION_NAME
    monkeypatch.setattr(hf_models, "TANGENT_SCORES_BYTES", 1)
    calls = _spy_on_jvps(la, monkeypatch)
    K = 5
    la.next_token_predictive(x, "glm", K, generator=torch.Generator().manual_seed(7))
    assert calls == [K]


def test_eager_attention_takes_fewer_directions_per_jvp_on_long_inputs(monkeypatch):
    """Gemma-2 soft-caps its attention scores: linearised through its eager
    attention, whose score tangents the default chunk bounds; the predictive
    is the same whatever the chunks (same draws)."""
    la = lm_laplace(make_peft_causal_lm(arch="gemma2"), prior_precision=4.0)
    la.fit(make_loader(make_lm_batch(n=6, T=6, seed=1), batch_size=3))
    x = make_lm_batch(n=2, T=4, seed=2)
    split = la.decoder_head_split(x)
    assert split is not None and la.jvp_attention(x) == "eager"
    B, T = x["input_ids"].shape
    heads = split.decoder.config.num_attention_heads
    per_direction = B * heads * T * T * 4
    K = 5
    monkeypatch.setattr(hf_models, "TANGENT_SCORES_BYTES", 2 * per_direction + 1)
    assert split.directions_per_jvp(x, K) == 2
    assert split.directions_per_jvp(x["input_ids"], K) == 2  # a tensor batch
    calls = _spy_on_jvps(la, monkeypatch)
    g = torch.Generator
    got = la.next_token_predictive(x, "glm", K, generator=g().manual_seed(7))
    assert calls == [2, 2, 1]
    whole = la.next_token_predictive(
        x, "glm", K, generator=g().manual_seed(7), chunk_size=K
    )
    assert calls[3:] == [K]
    assert rel_err(got.probs, whole.probs) < 1e-10
    assert rel_err(got.mutual_information, whole.mutual_information) < 1e-8
    monkeypatch.setattr(hf_models, "TANGENT_SCORES_BYTES", 1)
    assert split.directions_per_jvp(x, K) == 1
    monkeypatch.setattr(hf_models, "TANGENT_SCORES_BYTES", 2**40)
    assert split.directions_per_jvp(x, K) == K
    # the brute-force reference: the dense Jacobian along the same draws
    J, f_map = _dense_jacobian(la, x)
    deltas = la.sample(K, g().manual_seed(7)) - la.mean
    probs = torch.stack([(f_map + J @ d).softmax(-1) for d in deltas]).mean(0)
    assert rel_err(got.probs, probs) < 1e-6


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_linearised_predictive_of_an_sdpa_model(fitted, implementation):
    """SDPA (transformers' default) has no forward-mode derivative: the JVPs
    go through the tangent attention, and the model keeps its own
    implementation, also after an error inside the JVP."""
    la, x = fitted
    K = 4
    ref = la.next_token_predictive(
        x, "glm", K, generator=torch.Generator().manual_seed(5)
    )
    lm = hf_models.pretrained_model(la.model)
    before = lm.config._attn_implementation
    la2 = lm_laplace(la.model, prior_precision=4.0)  # the same posterior
    la2.fit(make_loader(make_lm_batch(n=6, T=6, seed=1), batch_size=3))
    lm.set_attn_implementation(implementation)
    try:
        got = la2.next_token_predictive(
            x, "glm", K, generator=torch.Generator().manual_seed(5)
        )
        assert la2.jvp_attention(x) == attention.ATTENTION_NAME
        assert lm.config._attn_implementation == implementation
        assert rel_err(got.probs, ref.probs) < 1e-10

        # an error inside the JVP, while the tangent attention is switched on
        def fail(module, args, output):
            assert lm.config._attn_implementation == attention.ATTENTION_NAME
            raise RuntimeError("inside the JVP")

        handle = lm.model.layers[1].register_forward_hook(fail)
        try:
            with pytest.raises(RuntimeError, match="inside the JVP"):
                la2.logits_and_jvp(x, torch.zeros(2, la2.n_params, dtype=torch.double))
        finally:
            handle.remove()
        assert lm.config._attn_implementation == implementation
        assert lm.model.layers[0].self_attn.config._attn_implementation == (
            implementation
        )
    finally:
        lm.set_attn_implementation(before)


def test_linearised_predictive_matches_exact_glm_predictive(fitted):
    """MC tolerance: 5 standard errors of the difference of the two estimates,
    entry by entry (512 entries), with the standard deviation of each softmax
    entry under the exact Gaussian."""
    la, x = fitted
    J, f_map = _dense_jacobian(la, x)
    Sigma = torch.linalg.inv(la.posterior_precision.to_matrix().double())
    f_var = torch.einsum("btvp,pq,btwq->btvw", J, Sigma, J)
    w, V = torch.linalg.eigh(f_var)
    L = V * w.clamp_min(0).sqrt().unsqueeze(-2)
    M, K = 20000, 300
    z = torch.randn(M, *f_map.shape, generator=torch.Generator().manual_seed(1))
    ref_samples = (f_map + torch.einsum("btvw,mbtw->mbtv", L, z.double())).softmax(-1)
    ref, std = ref_samples.mean(0), ref_samples.std(0)
    got = la.next_token_predictive(
        x, "glm", n_samples=K, generator=torch.Generator().manual_seed(4)
    )
    tol = 5 * std * (1 / K + 1 / M) ** 0.5 + 1e-9
    assert ((got.probs - ref).abs() <= tol).all()
    # the tolerance discriminates: the MAP softmax and the sampling
    # predictive (a different approximation) are outside it
    assert not ((f_map.softmax(-1) - ref).abs() <= tol).all()
    nn = la.next_token_predictive(
        x, "nn", n_samples=K, generator=torch.Generator().manual_seed(4)
    )
    assert not ((nn.probs - ref).abs() <= tol).all()


def test_map_predictive_has_no_epistemic_uncertainty(fitted):
    la, x = fitted
    got = la.next_token_predictive(x, "map")
    with torch.no_grad():
        expected = la.model(x).softmax(-1)
    assert torch.equal(got.probs, expected)
    assert torch.equal(got.mutual_information, torch.zeros_like(got.entropy))


def test_target_log_probs_read_the_next_tokens(fitted):
    la, x = fitted
    got = la.next_token_predictive(x, "map")
    lp = got.target_log_probs(x["labels"])
    has = x["labels"] != -100
    idx = x["labels"].clamp_min(0)[..., None]
    expected = got.probs.gather(-1, idx).squeeze(-1).log()
    assert torch.equal(lp[has], expected[has])
    assert (lp[~has] == 0).all()
    with pytest.raises(ValueError, match="next_token_labels"):
        got.target_log_probs(x["labels"][:, :2])


def test_bad_arguments_are_named(fitted):
    la, x = fitted
    with pytest.raises(ValueError, match="pred_type"):
        la.next_token_predictive(x, "probit")
    with pytest.raises(ValueError, match="n_samples"):
        la.next_token_predictive(x, "nn", n_samples=0)


def test_a_classifier_is_told_to_pass_the_causal_lm():
    model = make_peft_classifier("llama")
    la = Laplace(
        model, "classification", subset_of_weights="lora", hessian_structure="diag"
    )
    x = {"input_ids": torch.randint(3, 40, (2, 4))}
    with pytest.raises(ValueError, match=r"\(batch, tokens, vocab\)"):
        la.next_token_predictive(x, "map")


def test_prior_of_a_language_model_is_tuned_by_marglik():
    la = lm_laplace(make_peft_causal_lm())
    la.fit(make_loader(make_lm_batch(n=6, T=6, seed=1), batch_size=3))
    before = la.log_marginal_likelihood().item()
    # the trust region reads a classifier's predictive: the error says how
    with pytest.raises(ValueError, match=r"trust_region=None"):
        la.optimize_prior_precision()
    # laplace-torch's scalar prior: marglik raises the evidence from prior 1
    la.optimize_prior_precision(trust_region=None, prior_structure="scalar")
    assert la.log_marginal_likelihood().item() > before
    # the LoRA prior structure (the default) runs too
    la.optimize_prior_precision(trust_region=None)
    assert torch.isfinite(la.prior_precision).all()
