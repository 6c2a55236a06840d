"""Heads PEFT trains in full (``modules_to_save``) in the posterior.

With ``task_type="SEQ_CLS"`` PEFT trains the classifier head in full. Its
`nn.Linear` weights and biases join the posterior by default (one warning
names them), equal to laplace-torch's classes on the same trainable weights;
``modules_to_save=False`` leaves them out; ``lora_modules=["classifier"]`` is
last-layer Laplace on the head.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import make_loader
from laplace import DiagLaplace, KronLaplace, Laplace
from laplace.curvature import CurvlinopsGGN
from model_zoo import FAMILIES, build

import laplace_lora_backend  # noqa: F401
from laplace_lora_backend import LoRAGGN, LoRALayerNotFoundError, load_posterior
from laplace_lora_backend.hf_models import HFLogitsModel

HEADS = {"roberta": "classifier", "bert": "classifier", "gpt2": "score"}


def _batch(n: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(6, 40, (n, 5), generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _fit(la, batch):
    la.fit(make_loader(batch), progress_bar=False)
    return la


def _inputs(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


def test_heads_join_by_default_with_one_warning_naming_them():
    model, _ = build("roberta", "seq_cls", "qv")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        la = Laplace(model, "classification", subset_of_weights="lora")
    messages = [str(w.message) for w in caught if "modules_to_save" in str(w.message)]
    assert len(messages) == 1 and "classifier" in messages[0]
    assert "modules_to_save=False" in messages[0]
    kinds = [w.kind for w in la.lora_weights]
    assert kinds.count("head") == 2 and kinds.count("bias") == 2  # dense, out_proj
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # explicit: silent
        Laplace(model, "classification", subset_of_weights="lora", modules_to_save=True)
    la = Laplace(
        model, "classification", subset_of_weights="lora", modules_to_save=False
    )
    assert {w.kind for w in la.lora_weights} == {"A", "B"}


@pytest.mark.parametrize("structure", ["kron", "diag"])
@pytest.mark.parametrize("family", sorted(HEADS))
def test_lora_and_head_equal_laplace_torch_on_the_same_weights(family, structure):
    model, _ = build(family, "seq_cls", "qv")
    batch = _batch()
    la = _fit(
        Laplace(
            model,
            "classification",
            subset_of_weights="lora",
            hessian_structure=structure,
            modules_to_save=True,
            center_logits=False,
        ),
        batch,
    )
    # laplace-torch on every weight that requires grad: the LoRA weights and
    # the head's copy, in the same order
    up_cls = {"kron": KronLaplace, "diag": DiagLaplace}[structure]
    up = _fit(
        up_cls(HFLogitsModel(model), "classification", backend=CurvlinopsGGN), batch
    )
    assert la.n_params == up.n_params
    for prior in (1.0, torch.linspace(0.5, 2.0, la.n_layers, dtype=torch.float64)):
        la.prior_precision = up.prior_precision = prior
        torch.testing.assert_close(
            la.log_marginal_likelihood(),
            up.log_marginal_likelihood(),
            rtol=1e-9,
            atol=0,
        )
        x = _inputs(batch)
        torch.testing.assert_close(
            la(x, link_approx="probit"), up(x, link_approx="probit"), rtol=1e-9, atol=0
        )


def test_host_kron_laplace_with_our_backend_and_a_trainable_head():
    """laplace-torch's KronLaplace + LoRAGGN: the head's blocks line up (it
    raised "Can only add Kron objects with the same blocks")."""
    model, _ = build("bert", "seq_cls", "qv")
    batch = _batch()
    wrapped = HFLogitsModel(model)
    ours = _fit(KronLaplace(wrapped, "classification", backend=LoRAGGN), batch)
    ref = _fit(KronLaplace(wrapped, "classification", backend=CurvlinopsGGN), batch)
    torch.testing.assert_close(
        ours.log_marginal_likelihood(), ref.log_marginal_likelihood(), rtol=1e-9, atol=0
    )


@pytest.mark.parametrize("family", sorted(HEADS))
def test_last_layer_laplace_on_the_head(family):
    model, _ = build(family, "seq_cls", "qv")
    batch = _batch()
    la = _fit(
        Laplace(
            model,
            "classification",
            subset_of_weights="lora",
            hessian_structure="kron",
            lora_modules=[HEADS[family]],
            center_logits=False,
        ),
        batch,
    )
    assert {w.kind for w in la.lora_weights} <= {"head", "bias"}
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in lora:  # laplace-torch reference: only the head requires grad
        p.requires_grad_(False)
    try:
        up = _fit(
            KronLaplace(HFLogitsModel(model), "classification", backend=CurvlinopsGGN),
            batch,
        )
    finally:
        for p in lora:
            p.requires_grad_(True)
    assert la.n_params == up.n_params
    torch.testing.assert_close(
        la.log_marginal_likelihood(), up.log_marginal_likelihood(), rtol=1e-9, atol=0
    )


def test_a_trainable_linear_outside_peft_joins_when_named():
    model, _ = build("llama", "causal", "qv")
    head = model.model.base_model.model.lm_head
    head.weight.requires_grad_(True)  # e.g. a user who trains lm_head in full
    try:
        la = Laplace(
            model, "classification", subset_of_weights="lora", lora_modules=["lm_head"]
        )
        assert [w.kind for w in la.lora_weights] == ["head"]
        default = Laplace(model, "classification", subset_of_weights="lora")
        assert "head" not in {w.kind for w in default.lora_weights}
    finally:
        head.weight.requires_grad_(False)


def test_heads_survive_save_and_load_and_the_default_prior(tmp_path):
    model, _ = build("roberta", "seq_cls", "qv")
    batch = _batch()
    la = _fit(
        Laplace(
            model,
            "classification",
            subset_of_weights="lora",
            hessian_structure="kron",
            modules_to_save=True,
        ),
        batch,
    )
    la.optimize_prior_precision(trust_region=None)
    prior = la.prior_precision
    heads = [i for i, w in enumerate(la.lora_weights) if w.kind in ("head", "bias")]
    assert len(set(prior[heads].tolist())) == 1  # one tuned precision for the head
    la.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # saved as modules_to_save=True: silent
        loaded = load_posterior(tmp_path, model)
    assert [w.name for w in loaded.lora_weights] == [w.name for w in la.lora_weights]
    torch.testing.assert_close(
        loaded.log_marginal_likelihood(), la.log_marginal_likelihood()
    )


def test_a_transformers_model_without_lora_is_named_in_the_error():
    make_config, _, seq_cls, _ = FAMILIES["bert"]
    base = seq_cls(make_config())  # no PEFT
    with pytest.raises(LoRALayerNotFoundError, match="^BertForSequenceClassification"):
        Laplace(base, "classification", subset_of_weights="lora")


def test_a_big_head_is_left_out_by_default_and_joins_when_asked(monkeypatch):
    import laplace_lora_backend.curvature.discovery as discovery

    monkeypatch.setattr(discovery, "DEFAULT_HEAD_MAX_OUT", 2)  # "vocabulary-wide"
    model, _ = build("bert", "seq_cls", "qv")
    with pytest.warns(UserWarning, match=r"Left out of the posterior.*classifier"):
        la = Laplace(model, "classification", subset_of_weights="lora")
    assert {w.kind for w in la.lora_weights} == {"A", "B"}
    with warnings.catch_warnings():  # said once, where the posterior is built
        warnings.filterwarnings("error", message="Left out of the posterior")
        _fit(la, _batch())
        la(_inputs(_batch()), link_approx="probit")
    la = Laplace(
        model, "classification", subset_of_weights="lora", modules_to_save=True
    )
    assert "head" in {w.kind for w in la.lora_weights}


def test_a_head_layer_is_chosen_by_its_own_name():
    model, _ = build("roberta", "seq_cls", "qv")
    la = Laplace(
        model, "classification", subset_of_weights="lora", lora_modules=["out_proj"]
    )
    names = {w.layer_name for w in la.lora_weights}
    assert len(names) == 1 and names.pop().endswith("modules_to_save.default.out_proj")


def test_a_posterior_saved_before_heads_joined_loads_lora_only(tmp_path):
    import json

    model, _ = build("bert", "seq_cls", "qv")
    la = _fit(
        Laplace(
            model, "classification", subset_of_weights="lora", modules_to_save=False
        ),
        _batch(),
    )
    la.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "laplace_posterior.json").read_text())
    del config["settings"]["modules_to_save"]  # as written by earlier versions
    (tmp_path / "laplace_posterior.json").write_text(json.dumps(config))
    loaded = load_posterior(tmp_path, model)
    assert {w.kind for w in loaded.lora_weights} == {"A", "B"}
    torch.testing.assert_close(
        loaded.log_marginal_likelihood(), la.log_marginal_likelihood()
    )
