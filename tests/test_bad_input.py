"""Bad input fails with a clear error, and the Laplace object stays usable.

Each test provokes one mistake, checks the exception type and a fragment of
its message, then makes the correct call on the same object and checks that
it works (and, where it matters, gives the same numbers as a fresh object).
"""

from __future__ import annotations

import pytest
import torch
from helpers import make_batch, make_loader, make_peft_classifier
from laplace import Laplace
from peft import LoraConfig

import laplace_lora_backend  # noqa: F401
from laplace_lora_backend import LoRAGGN
from laplace_lora_backend.errors import (
    LoRAAdaptersChangedError,
    NonFiniteError,
    NotFittedError,
)


class ListLoader(list):
    """Batches in a list, with the `.dataset` length laplace-torch reads."""

    def __init__(self, batches, n=None):
        super().__init__(batches)
        self.dataset = range(n if n is not None else 3 * len(batches))


def new_la(structure="kron", **kwargs):
    model = make_peft_classifier("llama")
    la = Laplace(
        model,
        "classification",
        subset_of_weights="lora",
        hessian_structure=structure,
        **kwargs,
    )
    return model, la


@pytest.fixture(params=["kron", "diag", "full"])
def structure(request):
    return request.param


def test_predict_evidence_tuning_and_sampling_before_fit(structure):
    """Evidence, tuning, sampling and saving need fit; predicting does for kron
    (laplace-torch's KronLaplace raises too), while an unfitted diag / full
    posterior is the prior (laplace-torch's contract): a warning, not an error."""
    _, la = new_la(structure)
    batch = make_batch(4)
    calls = [
        lambda: la.log_marginal_likelihood(),
        lambda: la.optimize_prior_precision(method="marglik", n_steps=2),
        lambda: la.sample(2),
        lambda: la.state_dict(),
    ]
    if structure == "kron":
        calls += [
            lambda: la(batch),
            lambda: la.functional_variance(torch.zeros(1, 3, la.n_params)),
        ]
    for call in calls:
        with pytest.raises(NotFittedError, match=r"not fitted: call la.fit"):
            call()
        with pytest.raises(AttributeError):  # laplace-torch raised this
            call()
    if structure != "kron":
        with pytest.warns(UserWarning, match="not fitted: the predictive is the"):
            assert torch.isfinite(la(batch)).all()
    la.fit(make_loader(make_batch(6)))
    assert torch.isfinite(la(batch)).all()


def test_empty_loader_then_fit_works(structure):
    _, la = new_la(structure)
    for empty in (ListLoader([], n=0), iter([])):
        with pytest.raises(ValueError, match="train_loader is empty"):
            la.fit(ListLoader(empty, n=0) if not isinstance(empty, list) else empty)
    la.fit(make_loader(make_batch(6)))
    assert torch.isfinite(la.log_marginal_likelihood())


@pytest.mark.parametrize(
    "labels, match",
    [
        (torch.tensor([0, 1, 3]), r"\[0, 3\).*labels in \[0, 3\]"),
        (torch.tensor([-1, 0, 1]), r"labels in \[-1, 1\]"),
        (torch.tensor([[0], [1], [2]]), r"shape \(batch,\)"),
    ],
)
def test_labels_outside_the_classes(labels, match):
    _, la = new_la()
    good = make_batch(6)
    bad = {k: v[:3] for k, v in good.items()} | {"labels": labels}
    with pytest.raises(ValueError, match=match):
        la.fit(ListLoader([good, bad]))
    # the failed fit left nothing behind: not fitted, and a new fit is exact
    with pytest.raises(NotFittedError):
        la(good)
    la.fit(make_loader(good))
    _, fresh = new_la()
    fresh.fit(make_loader(good))
    assert torch.equal(la.log_marginal_likelihood(), fresh.log_marginal_likelihood())


def test_float_class_indices_are_a_type_error():
    _, la = new_la()
    batch = make_batch(6) | {"labels": torch.tensor([0.0, 1, 2, 0, 1, 2])}
    with pytest.raises(TypeError, match=r"int64 class indices.*y.long\(\)"):
        la.fit(ListLoader([batch]))
    la.fit(ListLoader([make_batch(6)]))


def test_backend_checks_targets_when_used_directly():
    model = make_peft_classifier("llama")
    backend = LoRAGGN(model, "classification")
    batch = make_batch(3)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        backend.kron(batch, batch["labels"] + 5, N=3)
    loss, _ = backend.kron(batch, batch["labels"], N=3)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("likelihood", ["reward_modeling", "clasification"])
def test_unsupported_likelihood(likelihood):
    model = make_peft_classifier("llama")
    with pytest.raises(ValueError, match="supports likelihood='classification'"):
        Laplace(model, likelihood, subset_of_weights="lora", hessian_structure="kron")


def test_batch_dicts_missing_keys():
    """Fit needs `dict_key_y`; predicting with a model that reads `dict_key_x`
    (transformers / PEFT, `AnswerTokenClassifier`) needs `dict_key_x`. Other
    models get the whole dict, so other input keys stay allowed."""
    from helpers import make_lm
    from peft import get_peft_model

    from laplace_lora_backend.llm import AnswerTokenClassifier

    lm, targets = make_lm("llama")
    peft_lm = get_peft_model(lm, LoraConfig(r=4, target_modules=targets)).double()
    model = AnswerTokenClassifier(peft_lm, [0, 1, 2]).eval()
    la = Laplace(
        model, "classification", subset_of_weights="lora", hessian_structure="kron"
    )
    batch = make_batch(6)
    no_y = {k: v for k, v in batch.items() if k != "labels"}
    no_x = {k: v for k, v in batch.items() if k != "input_ids"}
    with pytest.raises(ValueError, match=r"no key\(s\) \['labels'\].*dict_key_y"):
        la.fit(ListLoader([no_y]))
    la.fit(ListLoader([batch]))
    with pytest.raises(ValueError, match=r"no key\(s\) \['input_ids'\]"):
        la(no_x)
    assert torch.isfinite(la(batch)).all()


def test_other_input_keys_are_allowed_for_custom_models():
    """A custom model reading its own key is called with the whole dict."""
    model = make_peft_classifier("llama")
    inner = model.forward
    model.forward = lambda b: inner({"input_ids": b["tokens"]})
    batch = make_batch(6, pad=False)
    renamed = {"tokens": batch["input_ids"], "labels": batch["labels"]}
    la = Laplace(
        model, "classification", subset_of_weights="lora", hessian_structure="kron"
    )
    la.fit(ListLoader([renamed]))
    assert torch.isfinite(la(renamed)).all()


def test_kron_prior_structure_refused_and_previous_prior_kept():
    _, la = new_la()
    la.fit(make_loader(make_batch(6)))
    la.prior_precision = 2.0
    # laplace-torch's "either scalar or per-layer", with the lengths and the fix
    with pytest.raises(
        ValueError, match='per parameter needs hessian_structure="diag"'
    ):
        la.prior_precision = torch.ones(la.n_params)
    assert la.prior_precision.tolist() == [2.0]
    assert torch.isfinite(la.log_marginal_likelihood())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lowrank_rank": 0}, "lowrank_rank must be an integer >= 1"),
        ({"lowrank_rank": 2.5}, "lowrank_rank must be an integer >= 1"),
        ({"lowrank_threshold": 4}, "would compress the LoRA rank-4"),
        ({"lowrank_threshold": 2}, "use a threshold above the LoRA rank"),
    ],
)
def test_bad_lowrank_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        new_la(**kwargs)
    _, la = new_la(lowrank_threshold=8, lowrank_rank=3)  # a valid choice works
    la.fit(make_loader(make_batch(6)))
    assert torch.isfinite(la.log_marginal_likelihood())


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_non_positive_prior_precision(bad):
    with pytest.raises(ValueError, match="prior_precision must be positive"):
        new_la(prior_precision=bad)
    _, la = new_la()
    la.fit(make_loader(make_batch(6)))
    before = la.log_marginal_likelihood().item()
    for value in (bad, torch.tensor([bad]), torch.tensor([1.0, bad] * 4)):
        with pytest.raises(ValueError, match="prior_precision must be positive"):
            la.prior_precision = value
    assert la.log_marginal_likelihood().item() == before  # unchanged
    la.prior_precision = 2.0
    assert la.log_marginal_likelihood().item() != before


def _layer(model, i):
    return model.lm.base_model.model.model.layers[i]


def test_non_finite_activations_name_the_first_lora_module(structure):
    model, la = new_la(structure)
    batch = make_batch(6)

    def poison(module, args):
        return (args[0] * float("inf"),)

    handle = _layer(model, 1).register_forward_pre_hook(poison)
    with pytest.raises(NonFiniteError, match=r"inputs of LoRA module '.*layers\.1\."):
        la.fit(make_loader(batch))
    handle.remove()
    la.fit(make_loader(batch))
    assert torch.isfinite(la(batch)).all()


def test_non_finite_gradients_name_the_module():
    model, la = new_la("kron", backend_kwargs={"stochastic": True})
    batch = make_batch(6)

    def poison(module, args, output):
        if output.requires_grad:  # not in laplace-torch's no-grad probe pass
            output.register_hook(lambda g: g * float("nan"))

    v_proj = _layer(model, 1).self_attn.v_proj
    handle = v_proj.lora_B["default"].register_forward_hook(poison)
    with pytest.raises(NonFiniteError, match=r"output gradients of LoRA module"):
        la.fit(make_loader(batch))
    handle.remove()
    la.fit(make_loader(batch))
    assert torch.isfinite(la.log_marginal_likelihood())


def test_adapters_changed_between_fit_and_predict():
    model, la = new_la()
    batch = make_batch(6)
    la.fit(make_loader(batch))
    expected = la(batch)
    peft_model = model.lm
    peft_model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"]))
    peft_model.set_adapter("other")
    with pytest.raises(LoRAAdaptersChangedError, match=r"first difference: '.*"):
        la(batch)
    with pytest.raises(LoRAAdaptersChangedError, match="set_adapter"):
        la.functional_samples(batch, n_samples=2)
    peft_model.set_adapter("default")
    assert torch.equal(la(batch), expected)


def _la(**kwargs):
    return Laplace(
        make_peft_classifier("llama"),
        "classification",
        subset_of_weights="lora",
        **kwargs,
    )


def test_a_loader_of_dict_label_pairs_is_the_dict_loader():
    """(dict, y) tuples (a common collate) fit the same posterior as dict batches;
    a plain list of batches needs no `.dataset`."""
    batch = make_batch(n=6, pad=True)
    x = {k: v for k, v in batch.items() if k != "labels"}
    pairs = [
        ({k: v[i : i + 3] for k, v in x.items()}, batch["labels"][i : i + 3])
        for i in (0, 3)
    ]
    la, ref = _la(), _la()
    la.fit(pairs)
    ref.fit(make_loader(batch))
    assert la.n_data == ref.n_data == 6
    assert torch.allclose(la.H.to_matrix(), ref.H.to_matrix())


def test_a_one_pass_iterable_without_dataset_says_what_to_pass():
    batch = make_batch(n=6, pad=True)
    la = _la()
    with pytest.raises(TypeError, match=r"len\(train_loader.dataset\).*DataLoader"):
        la.fit(iter([batch]))
    la.fit(make_loader(batch))  # still usable


@pytest.mark.parametrize("wrap", ["list", "loader"])
def test_predicting_a_list_or_a_loader_says_how(wrap):
    batch = make_batch(n=6, pad=True)
    la = _la()
    la.fit(make_loader(batch))
    x = [batch] if wrap == "list" else make_loader(batch)
    with pytest.raises(TypeError, match=r"one batch.*torch.cat\(\[la\(batch\)"):
        la(x)
    assert la(batch).shape == (6, 3)  # the object stays usable


def test_prior_of_the_wrong_length_names_the_expected_lengths():
    la = _la()
    la.fit(make_loader(make_batch(n=6, pad=True)))
    before = la.prior_precision.clone()
    with pytest.raises(ValueError, match=r"expected 1 .* 8 .*apart: 4 A \+ 4 B"):
        la.prior_precision = torch.ones(3)
    assert torch.equal(la.prior_precision, before)


def test_predicting_in_training_mode_warns():
    la = _la()
    batch = make_batch(n=6, pad=True)
    la.fit(make_loader(batch))
    la.model.train()
    try:
        with pytest.warns(UserWarning, match=r"training mode.*model.eval\(\)"):
            la(batch)
    finally:
        la.model.eval()
