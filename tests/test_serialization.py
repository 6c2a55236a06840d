"""Saving / loading LoRA Laplace posteriors: safetensors + JSON, state_dict."""

from __future__ import annotations

import hashlib
import io
import json
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import (
    LastTokenHead,
    make_batch,
    make_lm,
    make_loader,
    make_peft_classifier,
)
from laplace import Laplace
from peft import PeftModel
from safetensors.torch import load_file

import laplace_lora_backend  # noqa: F401
from laplace_lora_backend import (
    LoRADiagLaplace,
    LoRAFullLaplace,
    LoRAKronLaplace,
    LoRALaplace,
)
from laplace_lora_backend.matrix import LowRankFactor
from laplace_lora_backend.serialization import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdapterMismatchError,
    load_posterior,
    save_posterior,
)

CASES = {
    "kron-dense": ("kron", {"lowrank_threshold": None}),
    "kron-lowrank": ("kron", {"lowrank_threshold": 16, "lowrank_rank": 4}),
    "diag": ("diag", {"lora_modules": re.compile(r"layers\.1\.")}),
    "full": ("full", {"lora_modules": ["v_proj"]}),
}
CLASSES = {"kron": LoRAKronLaplace, "diag": LoRADiagLaplace, "full": LoRAFullLaplace}


def fit(
    structure: str, model: torch.nn.Module | None = None, **kwargs: Any
) -> tuple[LoRALaplace, torch.nn.Module, dict[str, torch.Tensor]]:
    """Fitted posterior on the tiny Llama classifier, with a layerwise prior."""
    model = make_peft_classifier("llama") if model is None else model
    batch = make_batch(n=6, pad=True)
    la = Laplace(
        model,
        "classification",
        subset_of_weights="lora",
        hessian_structure=structure,
        **kwargs,
    )
    la.fit(make_loader(batch, batch_size=3))
    la.prior_precision = torch.linspace(0.5, 2.0, la.n_layers, dtype=torch.float64)
    return la, model, batch


def assert_identical(a: LoRALaplace, b: LoRALaplace, batch: dict) -> None:
    """Evidence, GLM probit predictive and seeded samples equal bit for bit."""
    assert type(a) is type(b)
    assert [w.name for w in a.lora_weights] == [w.name for w in b.lora_weights]
    assert torch.equal(a.log_marginal_likelihood(), b.log_marginal_likelihood())
    pa = a(batch, pred_type="glm", link_approx="probit")
    pb = b(batch, pred_type="glm", link_approx="probit")
    assert torch.equal(pa, pb)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert torch.equal(a.sample(7, generator=g1), b.sample(7, generator=g2))


def digest(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
    }


@pytest.fixture(scope="module")
def saved_kron(tmp_path_factory):
    """A low-rank K-FAC posterior saved beside its PEFT adapter."""
    la, model, batch = fit("kron", lowrank_threshold=16, lowrank_rank=4)
    directory = tmp_path_factory.mktemp("posterior")
    model.lm.save_pretrained(directory)  # PEFT adapter files
    adapter = digest(directory)
    la.save_pretrained(directory)
    return directory, adapter, la, batch


@pytest.mark.parametrize("case", list(CASES))
def test_save_load_round_trip_is_exact(case, tmp_path, monkeypatch):
    structure, kwargs = CASES[case]
    la, model, batch = fit(structure, **kwargs)
    save_posterior(la, tmp_path)

    def no_pickle(*args, **kw):
        raise AssertionError("load_posterior must not unpickle (torch.load)")

    with monkeypatch.context() as m, warnings.catch_warnings():
        m.setattr(torch, "load", no_pickle)
        warnings.simplefilter("error", UserWarning)
        la2 = load_posterior(tmp_path, model)
    assert_identical(la, la2, batch)
    assert torch.equal(la2.prior_precision, la.prior_precision)
    if structure == "kron":
        kinds = [[type(F) for F in b] for b in la.H_facs.kfacs]
        assert [[type(F) for F in b] for b in la2.H_facs.kfacs] == kinds
    if case == "kron-lowrank":
        assert LowRankFactor in {t for b in kinds for t in b}
        assert la2.lowrank_options == la.lowrank_options
    if case == "diag":
        assert la2.lora_modules.pattern == r"layers\.1\."

    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["key"] == ["lora", structure]
    assert config["class"] == CLASSES[structure].__name__
    assert [w["name"] for w in config["lora_weights"]] == [
        w.name for w in la.lora_weights
    ]
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    assert torch.equal(tensors["mean"], la.mean)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]

    # laplace-torch's state_dict through torch.save / torch.load(weights_only)
    buf = io.BytesIO()
    torch.save(la.state_dict(), buf)
    buf.seek(0)
    la3 = Laplace(
        model,
        "classification",
        subset_of_weights="lora",
        hessian_structure=structure,
        **kwargs,
    )
    la3.load_state_dict(torch.load(buf, weights_only=True))
    assert_identical(la, la3, batch)


def test_adapter_and_posterior_reload_into_fresh_model(saved_kron):
    directory, adapter, la, batch = saved_kron
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(adapter)
    after = digest(directory)
    assert {k: after[k] for k in adapter} == adapter  # adapter files untouched
    assert set(after) - set(adapter) == {CONFIG_NAME, WEIGHTS_NAME}

    lm, _ = make_lm("llama", seed=0)
    peft_model = PeftModel.from_pretrained(lm.double(), directory)
    model = LastTokenHead(peft_model).double().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        la2 = LoRAKronLaplace.from_pretrained(directory, model)
    assert la2.model is not la.model
    assert_identical(la, la2, batch)
    assert isinstance(LoRALaplace.from_pretrained(directory, model), LoRAKronLaplace)


@pytest.mark.parametrize(
    "model_kwargs, fragment",
    [
        # r=8 instead of 4: the very first weight differs in shape
        (
            {"r": 8},
            r"'lm\..*layers\.0\.self_attn\.q_proj\.lora_A\.default\.weight' has shape "
            r"\(8, 32\) in the model but \(4, 32\) .*r=4 saved, r=8 in the model",
        ),
        # no LoRA on v_proj: the third weight is missing
        (
            {"targets": ["q_proj"]},
            r"'lm\..*layers\.0\.self_attn\.v_proj\.lora_A\.default\.weight' "
            r"\(shape \(4, 32\)\) of the saved posterior is missing",
        ),
        # an extra k_proj adapter
        (
            {"targets": ["q_proj", "k_proj", "v_proj"]},
            r"model has LoRA weight '.*layers\.0\.self_attn\.k_proj\.lora_A",
        ),
    ],
)
def test_mismatched_adapter_is_refused(saved_kron, model_kwargs, fragment):
    directory = saved_kron[0]
    model = make_peft_classifier("llama", **model_kwargs)
    with pytest.raises(AdapterMismatchError, match=fragment) as err:
        load_posterior(directory, model)
    assert isinstance(err.value, ValueError)
    assert "same target_modules and r" in str(err.value)


def test_wrong_structure_and_moved_weights(saved_kron):
    directory, _, la, _ = saved_kron
    model = make_peft_classifier("llama")
    with pytest.raises(ValueError, match="LoRAKronLaplace posterior.*not a LoRADiag"):
        LoRADiagLaplace.from_pretrained(directory, model)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n).add_(0.1)
    with pytest.warns(UserWarning, match="differ from the mean"):
        la2 = load_posterior(directory, model)
    assert torch.equal(la2.mean, la.mean)


def test_missing_posterior_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        load_posterior(tmp_path, make_peft_classifier("llama"))


def test_state_dict_with_likelihood_enum_loads_weights_only():
    from laplace.utils.enums import Likelihood

    model = make_peft_classifier("llama")
    batch = make_batch(n=6, pad=True)
    la = Laplace(
        model,
        Likelihood.CLASSIFICATION,
        subset_of_weights="lora",
        hessian_structure="diag",
    )
    la.fit(make_loader(batch, batch_size=3))
    buf = io.BytesIO()
    torch.save(la.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert type(state["likelihood"]) is str
    la2 = Laplace(
        model, "classification", subset_of_weights="lora", hessian_structure="diag"
    )
    la2.load_state_dict(state)
    assert_identical(la, la2, batch)
