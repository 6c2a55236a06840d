"""The LoRA K-FAC backend against Curvlinops (laplace-torch's default backend)
and against brute-force torch.func Jacobians, in float64."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    brute_force_jacobians,
    make_batch,
    make_peft_classifier,
    rel_err,
)
from laplace.curvature import CurvlinopsEF, CurvlinopsGGN
from laplace.utils import Kron

from laplace_lora_backend import LoRAEF, LoRAGGN

TOL = 1e-10
PAIRS = [(LoRAGGN, CurvlinopsGGN), (LoRAEF, CurvlinopsEF)]


def assert_kron_close(ours: Kron, ref: Kron, tol: float = TOL) -> None:
    assert len(ours.kfacs) == len(ref.kfacs)
    for block_o, block_r in zip(ours.kfacs, ref.kfacs, strict=True):
        assert len(block_o) == len(block_r) == 2
        for Fo, Fr in zip(block_o, block_r, strict=True):
            assert Fo.shape == Fr.shape
            assert rel_err(Fo, Fr) <= tol


@pytest.mark.parametrize("ours, ref", PAIRS, ids=["GGN", "EF"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_kron_equals_curvlinops_without_padding(arch, ours, ref, approx):
    """Factors and loss equal Curvlinops' K-FAC on the same LoRA weights."""
    model = make_peft_classifier(arch)
    batch = make_batch(pad=False)
    y = batch["labels"]
    loss_o, kron_o = ours(model, "classification", kfac_approx=approx).kron(
        batch, y, N=10
    )
    loss_r, kron_r = ref(model, "classification").kron(
        batch, y, N=10, kfac_approx=approx
    )
    assert torch.allclose(loss_o, loss_r, rtol=1e-12)
    assert_kron_close(kron_o, kron_r)


@pytest.mark.parametrize("ours, ref", PAIRS, ids=["GGN", "EF"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_padding_excluded_equals_curvlinops_per_unpadded_example(
    arch, ours, ref, approx
):
    """With left padding our factors equal the sum of Curvlinops' factors over
    each example run alone without its padding (Curvlinops itself would count
    the padding positions): the exact relation of the two conventions."""
    model = make_peft_classifier(arch)
    batch = make_batch(n=6, pad=True)
    N = 6
    _, kron_o = ours(model, "classification", kfac_approx=approx).kron(
        batch, batch["labels"], N=N
    )
    backend = ref(model, "classification")
    total = None
    for i in range(N):
        keep = batch["attention_mask"][i].bool()
        one = {
            "input_ids": batch["input_ids"][i : i + 1, keep],
            "attention_mask": batch["attention_mask"][i : i + 1, keep],
            "labels": batch["labels"][i : i + 1],
        }
        _, k = backend.kron(one, one["labels"], N=N, kfac_approx=approx)
        total = k if total is None else total + k
    assert_kron_close(kron_o, total, tol=1e-9)


def test_padding_changes_nothing_when_mask_is_all_ones(arch):
    """An all-ones mask gives the same factors as no mask at all."""
    model = make_peft_classifier(arch)
    batch = make_batch(pad=False)
    no_mask = {k: v for k, v in batch.items() if k != "attention_mask"}
    backend = LoRAGGN(model, "classification")
    _, k1 = backend.kron(batch, batch["labels"], N=6)
    _, k2 = backend.kron(no_mask, batch["labels"], N=6)
    assert_kron_close(k1, k2, tol=1e-14)


def test_mc_fisher_equals_ef_at_sampled_labels():
    """MC Fisher with one sample is the EF at labels drawn from the model,
    with the same global RNG draws; the returned loss uses the true labels."""
    model = make_peft_classifier("llama")
    batch = make_batch(pad=True)
    torch.manual_seed(123)
    loss_mc, kron_mc = LoRAGGN(model, "classification", stochastic=True).kron(
        batch, batch["labels"], N=6
    )
    torch.manual_seed(123)
    with torch.no_grad():
        y_s = torch.multinomial(model(batch).softmax(-1), 1).squeeze(-1)
    _, kron_ef = LoRAEF(model, "classification").kron(batch, y_s, N=6)
    loss_ef, _ = LoRAEF(model, "classification").kron(batch, batch["labels"], N=6)
    assert_kron_close(kron_mc, kron_ef, tol=1e-12)
    assert torch.allclose(loss_mc, loss_ef)


def test_mc_fisher_converges_to_ggn():
    """Averaging many MC samples approaches the exact GGN's output factor."""
    model = make_peft_classifier("llama")
    batch = make_batch(pad=False)
    torch.manual_seed(0)
    _, mc = LoRAGGN(model, "classification", stochastic=True, num_samples=2000).kron(
        batch, batch["labels"], N=6
    )
    _, exact = LoRAGGN(model, "classification").kron(batch, batch["labels"], N=6)
    for Fm, Fe in zip(mc.kfacs, exact.kfacs, strict=True):
        assert rel_err(Fm[0], Fe[0]) < 0.1  # Monte-Carlo error ~ 1/sqrt(2000)
        assert rel_err(Fm[1], Fe[1]) < 1e-12  # input factor is deterministic


def test_mc_fisher_diag_equals_ef_diag_at_sampled_labels():
    """MC diagonal with one sample is the EF diagonal (squared per-example
    gradients) at labels drawn from the model with the same RNG draws."""
    model = make_peft_classifier("llama")
    batch = make_batch(pad=True)
    torch.manual_seed(7)
    loss_mc, diag_mc = LoRAGGN(model, "classification", stochastic=True).diag(
        batch, batch["labels"]
    )
    torch.manual_seed(7)
    with torch.no_grad():
        y_s = torch.multinomial(model(batch).softmax(-1), 1).squeeze(-1)
    _, diag_ef = LoRAEF(model, "classification").diag(batch, y_s)
    loss_ref, _ = LoRAEF(model, "classification").diag(batch, batch["labels"])
    assert rel_err(diag_mc, diag_ef) < 1e-12
    assert torch.allclose(loss_mc, loss_ref)


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_mc_fisher_diag_converges_to_exact_ggn_diag(likelihood):
    """Averaging many samples approaches the exact GGN diagonal (the one
    from full Jacobians), with the laplace-torch loss scaling."""
    n_out = 3 if likelihood == "classification" else 2
    model = make_peft_classifier("llama", n_out=n_out)
    batch = make_batch(pad=False, n_out=n_out)
    y = batch["labels"] if n_out == 3 else torch.randn(6, 2).double()
    torch.manual_seed(0)
    mc = LoRAGGN(model, likelihood, stochastic=True, num_samples=2000)
    loss_mc, diag_mc = mc.diag(batch, y)
    loss, diag = LoRAGGN(model, likelihood).diag(batch, y)
    assert rel_err(diag_mc, diag) < 0.1  # Monte-Carlo error ~ 1/sqrt(2000)
    assert torch.allclose(loss_mc, loss)


@pytest.mark.parametrize("ours, ref", PAIRS, ids=["GGN", "EF"])
def test_regression_kron_equals_curvlinops(ours, ref):
    """Regression (0.5 * MSE sum) factors and loss equal Curvlinops'."""
    model = make_peft_classifier("llama", n_out=2)
    batch = make_batch(pad=False)
    y = torch.randn(6, 2, generator=torch.Generator().manual_seed(1)).double()
    loss_o, kron_o = ours(model, "regression").kron(batch, y, N=8)
    loss_r, kron_r = ref(model, "regression").kron(batch, y, N=8)
    assert torch.allclose(loss_o, loss_r, rtol=1e-12)
    assert_kron_close(kron_o, kron_r)


def test_jacobians_equal_torch_func(arch):
    """Per-class VJP Jacobians equal torch.func.jacrev over the LoRA weights."""
    model = make_peft_classifier(arch)
    batch = make_batch(pad=True)
    backend = LoRAGGN(model, "classification")
    Js, f = backend.jacobians(batch)
    J_ref, f_ref = brute_force_jacobians(model, backend.lora_weights, batch)
    assert Js.shape == J_ref.shape == (6, 3, sum(p.numel() for p in backend.params))
    assert rel_err(Js, J_ref) < 1e-11
    assert torch.allclose(f, f_ref)


def test_per_example_gradients_equal_torch_func():
    """EF per-example gradients equal brute-force loss gradients."""
    model = make_peft_classifier("llama")
    batch = make_batch(pad=True)
    backend = LoRAEF(model, "classification")
    Gs, loss = backend.gradients(batch, batch["labels"])
    J, f = brute_force_jacobians(model, backend.lora_weights, batch)
    dloss_df = f.softmax(-1) - torch.nn.functional.one_hot(batch["labels"], 3)
    # transformers' RMSNorm and RoPE compute in float32 even in a float64 model,
    # so backward passes with different cotangents agree only to float32
    # rounding: J^T d and sum_c d_c J^T e_c differ by ~1e-8 here.
    assert rel_err(Gs, torch.einsum("bc,bcp->bp", dloss_df, J)) < 1e-6
    # Summed over the batch they equal autograd's gradient of the loss exactly.
    loss_ref = torch.nn.functional.cross_entropy(
        model(batch), batch["labels"], reduction="sum"
    )
    grad = torch.autograd.grad(loss_ref, backend.params)
    assert rel_err(Gs.sum(0), torch.cat([g.flatten() for g in grad])) < 1e-12
    assert torch.allclose(
        loss, torch.nn.functional.cross_entropy(f, batch["labels"], reduction="sum")
    )


def test_frozen_lora_weights_still_get_curvature():
    """Curvature does not depend on requires_grad, and flags are restored."""
    model = make_peft_classifier("llama")
    batch = make_batch()
    backend = LoRAGGN(model, "classification")
    _, k1 = backend.kron(batch, batch["labels"], N=6)
    model.requires_grad_(False)
    _, k2 = backend.kron(batch, batch["labels"], N=6)
    assert_kron_close(k2, k1, tol=0)
    assert not any(p.requires_grad for p in model.parameters())


def test_unknown_kfac_approx_names_the_options():
    model = make_peft_classifier("llama")
    with pytest.raises(ValueError, match="'expand'.*'reduce'"):
        LoRAGGN(model, "classification", kfac_approx="mean")


def test_sequence_output_is_rejected_with_a_fix():
    """A model returning (batch, tokens, vocab) logits gets told to wrap it."""
    model = make_peft_classifier("llama")
    lm = model.lm
    batch = make_batch()

    class Raw(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = lm

        def forward(self, b):
            return self.lm(input_ids=b["input_ids"]).logits

    with pytest.raises(ValueError, match=r"\(batch, outputs\)"):
        LoRAGGN(Raw(), "classification").kron(batch, batch["labels"], N=6)


def test_last_layer_argument_is_rejected():
    with pytest.raises(ValueError, match="lm_head"):
        LoRAGGN(make_peft_classifier("llama"), "classification", last_layer=True)


@pytest.mark.parametrize("method", ["jacobians", "gradients", "kron"])
def test_no_autograd_graph_outlives_a_call(method):
    """Hooks must not keep the graph alive (a cycle through autograd's C++
    hooks once leaked ~200 MB per batch on SmolLM2)."""
    import gc
    import weakref

    model = make_peft_classifier("llama")
    batch = make_batch()
    backend = LoRAGGN(model, "classification")
    refs = []
    module = backend.lora_weights[0].module
    handle = module.register_forward_hook(
        lambda m, a, out: refs.append(weakref.ref(out))
    )
    args = {
        "jacobians": (batch,),
        "gradients": (batch, batch["labels"]),
        "kron": (batch, batch["labels"], 6),
    }[method]
    getattr(backend, method)(*args)
    handle.remove()
    gc.collect()
    assert refs and all(r() is None for r in refs)
