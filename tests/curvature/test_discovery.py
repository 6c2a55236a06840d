"""LoRA weight selection: by module, in parameter order, with filters."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import make_lm, make_peft_classifier

from laplace_lora_backend import (
    LoRALayerNotFoundError,
    UnsupportedLoRALayerError,
    find_lora_weights,
)
from laplace_lora_backend.curvature.discovery import grad_enabled


def test_order_and_shapes_follow_named_parameters(arch):
    """All lora_A/lora_B weights, in named_parameters order, with PEFT shapes."""
    model = make_peft_classifier(arch, r=4)
    weights = find_lora_weights(model)
    expected = [n for n, _ in model.named_parameters() if ".lora_" in n]
    assert [w.name for w in weights] == expected
    # 2 layers x (q, v) or (c_attn) x (A, B)
    assert len(weights) == (8 if arch == "llama" else 4)
    for w in weights:
        assert w.param is w.module.weight
        assert w.param.shape[0 if w.kind == "A" else 1] == 4


def test_selection_ignores_requires_grad():
    """Frozen LoRA weights are selected; trainable non-LoRA weights are not."""
    model = make_peft_classifier("llama")
    model.requires_grad_(False)
    model.lm.base_model.model.lm_head.weight.requires_grad_(True)
    names = [w.name for w in find_lora_weights(model)]
    assert len(names) == 8 and all(".lora_" in n for n in names)


@pytest.mark.parametrize(
    "lora_modules, n_expected",
    [(["q_proj"], 2), (["layers.0."], 2), ("v_proj$", 2), (re.compile(r"\.1\."), 2)],
)
def test_filters(lora_modules, n_expected):
    """Substring lists and regexes restrict the LoRA layers."""
    model = make_peft_classifier("llama")
    weights = find_lora_weights(model, lora_modules)
    assert len(weights) == 2 * n_expected
    layers = {w.layer_name for w in weights}
    assert len(layers) == n_expected


def test_lm_head_lora_is_llla():
    """lora_modules=['lm_head'] keeps just the LoRA weights of lm_head."""
    model = make_peft_classifier("llama", targets=["q_proj", "v_proj", "lm_head"])
    weights = find_lora_weights(model, ["lm_head"])
    assert [w.kind for w in weights] == ["A", "B"]
    assert all(w.layer_name.endswith("lm_head") for w in weights)


def test_no_lora_layer_raises():
    """A model without LoRA says how to add LoRA."""
    lm, _ = make_lm("llama")
    with pytest.raises(LoRALayerNotFoundError, match="get_peft_model"):
        find_lora_weights(lm)


def test_filter_without_match_lists_layers():
    """A filter matching nothing names the LoRA layers that exist."""
    model = make_peft_classifier("llama")
    with pytest.raises(ValueError, match=r"q_proj.*v_proj") as info:
        find_lora_weights(model, ["o_proj"])
    assert isinstance(info.value, LoRALayerNotFoundError)


def test_bad_filter_type_raises_type_error():
    with pytest.raises(TypeError, match="lora_modules"):
        find_lora_weights(make_peft_classifier("llama"), 3)


def test_merged_adapter_raises():
    """Merged LoRA weights are not in the forward pass: refuse them."""
    model = make_peft_classifier("llama")
    model.lm.merge_adapter()
    with pytest.raises(UnsupportedLoRALayerError, match="unmerge"):
        find_lora_weights(model)


def test_grad_enabled_restores_flags_on_error():
    model = make_peft_classifier("llama")
    weights = find_lora_weights(model)
    for w in weights:
        w.param.requires_grad_(False)
    with pytest.raises(RuntimeError), grad_enabled(weights):
        assert all(w.param.requires_grad for w in weights)
        raise RuntimeError
    assert not any(w.param.requires_grad for w in weights)
    assert torch.is_tensor(weights[0].param)
