"""The non-public parts of laplace-torch and PEFT that the package relies on.

Each is listed here with where we use it, so that an upstream release that
renames or re-signs one fails this file first, with a message that names it,
instead of failing deep inside a fit.
"""

from __future__ import annotations

import inspect

import pytest
from laplace import DiagLaplace, FullLaplace, KronLaplace, ParametricLaplace
from peft.tuners.lora import LoraLayer

# laplace-torch hooks overridden or called (the documented extension points
# `_init_H` / `_curv_closure`, and the predictive hooks laplace-torch's own
# subclasses override), with the parameters we pass or accept
LAPLACE_HOOKS = {
    (ParametricLaplace, "_init_H"): ["self"],
    (ParametricLaplace, "_check_H_init"): ["self"],
    (KronLaplace, "_curv_closure"): ["self", "X", "y", "N"],
    (ParametricLaplace, "_glm_predictive_distribution"): [
        "self",
        "X",
        "joint",
        "diagonal_output",
    ],
    (ParametricLaplace, "_nn_functional_samples"): [
        "self",
        "X",
        "n_samples",
        "generator",
        "model_kwargs",
    ],
    (ParametricLaplace, "_nn_predictive_classification"): [
        "self",
        "X",
        "n_samples",
        "model_kwargs",
    ],
    (KronLaplace, "load_state_dict"): ["self", "state_dict"],
    (KronLaplace, "__init__"): [
        "self",
        "model",
        "likelihood",
        "sigma_noise",
        "prior_precision",
        "prior_mean",
        "temperature",
        "enable_backprop",
        "dict_key_x",
        "dict_key_y",
        "backend",
        "damping",
        "backend_kwargs",
        "asdl_fisher_kwargs",
    ],
}


@pytest.mark.parametrize("owner, name", list(LAPLACE_HOOKS), ids=str)
def test_laplace_torch_hooks_keep_their_signature(owner, name):
    method = getattr(owner, name, None)
    assert method is not None, f"laplace-torch's {owner.__name__}.{name} is gone"
    params = list(inspect.signature(method).parameters)
    assert params == LAPLACE_HOOKS[(owner, name)], (
        f"laplace-torch's {owner.__name__}.{name} now takes {params}"
    )


@pytest.mark.parametrize("cls", [KronLaplace, DiagLaplace, FullLaplace])
def test_laplace_torch_state_we_read(cls):
    """Attributes read in loralaplace / serialization / prior tuning, and
    ParametricLaplace leaving `_init_H` to a subclass that set `H` first."""
    from helpers import make_peft_classifier

    la = cls(make_peft_classifier("llama"), "classification")
    for attr in ("_backend_cls", "_backend_kwargs", "_asdl_fisher_kwargs"):
        assert hasattr(la, attr), f"laplace-torch no longer sets {attr}"
    assert 'if not hasattr(self, "H")' in inspect.getsource(
        ParametricLaplace.__init__
    ), "ParametricLaplace.__init__ no longer skips _init_H when H is set"


def test_peft_lora_layer_attributes_we_read():
    """curvature/discovery.py reads these to find the active, unmerged adapters."""
    source = inspect.getsource(LoraLayer)
    for attr in ("lora_A", "lora_B", "active_adapters", "merged", "lora_variant"):
        assert attr in source, f"peft's LoraLayer has no {attr!r} any more"


def test_peft_modules_to_save_wrapper_attributes_we_read():
    """curvature/discovery.py reads these to find the head a forward pass uses
    (``modules_to_save[active_adapters[0]]`` unless adapters are disabled)."""
    from peft.utils import ModulesToSaveWrapper

    source = inspect.getsource(ModulesToSaveWrapper)
    assert "self.modules_to_save[self.active_adapters[0]]" in source, (
        "peft's ModulesToSaveWrapper no longer runs modules_to_save[active_adapters[0]]"
    )
    for attr in ("active_adapters", "disable_adapters"):
        assert isinstance(getattr(ModulesToSaveWrapper, attr), property), attr


def test_transformers_attention_conventions_we_rely_on():
    """attention/switch.py: a config's `_attn_implementation` (read, and set
    through the public `set_attn_implementation`, which takes nested dicts
    per sub-config), and each modeling file's module-level
    `eager_attention_forward`, the default its attention layers pass to
    `AttentionInterface.get_interface` (the model's own eager attention)."""
    import transformers as tf
    from transformers.models.gpt2 import modeling_gpt2
    from transformers.models.llama import modeling_llama

    from laplace_lora_backend.attention import eager_attention_of

    assert isinstance(tf.PretrainedConfig._attn_implementation, property)
    params = inspect.signature(tf.PreTrainedModel.set_attn_implementation).parameters
    assert "attn_implementation" in params
    for modeling in (modeling_llama, modeling_gpt2):
        source = inspect.getsource(modeling)
        assert "get_interface(" in source and "eager_attention_forward" in source, (
            f"{modeling.__name__} no longer defaults to eager_attention_forward"
        )
    lm = tf.LlamaForCausalLM(
        tf.LlamaConfig(
            vocab_size=8,
            hidden_size=8,
            intermediate_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )  # fmt: skip
    )
    attn = lm.model.layers[0].self_attn
    assert eager_attention_of(attn) is modeling_llama.eager_attention_forward
