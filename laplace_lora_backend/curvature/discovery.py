"""Find the LoRA weights of a model, by module type, in parameter order.

laplace-torch selects "all weights that require grad". For Laplace-LoRA we
select the `lora_A` / `lora_B` weights of the active adapters of every PEFT
LoRA layer, whatever their `requires_grad` flag, and order them as
`model.named_parameters()` does, so that parameter vectors, samples and
Jacobian columns line up with laplace-torch's.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from torch import nn

from laplace_lora_backend.errors import (
    LoRALayerNotFoundError,
    UnsupportedLoRALayerError,
)

__all__ = [
    "LoRAWeight",
    "find_lora_weights",
    "grad_enabled",
    "lora_init",
    "lora_layer_names",
]


@dataclass(frozen=True)
class LoRAWeight:
    """One LoRA weight matrix and the `nn.Linear` that applies it.

    Attributes
    ----------
    name : str
        Parameter name in `model.named_parameters()`, e.g.
        ``"base_model.model.layers.0.self_attn.q_proj.lora_A.default.weight"``.
    layer_name : str
        Name of the PEFT LoRA layer holding it (``"...q_proj"``).
    adapter : str
        Adapter name (``"default"``).
    kind : str
        ``"A"`` for `lora_A` (shape `(r, in_features)`), ``"B"`` for `lora_B`
        (shape `(out_features, r)`).
    module : torch.nn.Linear
        The `lora_A[adapter]` / `lora_B[adapter]` linear module.
    param : torch.nn.Parameter
        Its weight.
    """

    name: str
    layer_name: str
    adapter: str
    kind: str
    module: nn.Linear
    param: nn.Parameter

    @property
    def out_features(self) -> int:
        """Rows of the weight (side of the output-gradient factor)."""
        return self.param.shape[0]

    @property
    def in_features(self) -> int:
        """Columns of the weight (side of the input factor)."""
        return self.param.shape[1]


def _is_lora_layer(module: nn.Module) -> bool:
    # Imported lazily-free: peft is a hard dependency, but keep the check
    # structural so that subclasses of LoraLayer (quantised ones) match too.
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer)


def lora_layer_names(model: nn.Module) -> list[str]:
    """Names of all PEFT LoRA layers in `model`, in module order.

    Parameters
    ----------
    model : torch.nn.Module

    Returns
    -------
    names : list[str]
    """
    return [name for name, module in model.named_modules() if _is_lora_layer(module)]


def _matcher(lora_modules: str | Sequence[str] | re.Pattern | None):
    if lora_modules is None:
        return lambda name: True
    if isinstance(lora_modules, re.Pattern):
        return lambda name: lora_modules.search(name) is not None
    if isinstance(lora_modules, str):
        pattern = re.compile(lora_modules)
        return lambda name: pattern.search(name) is not None
    if isinstance(lora_modules, Sequence) and all(
        isinstance(s, str) for s in lora_modules
    ):
        subs = list(lora_modules)
        if not subs:
            raise ValueError(
                "`lora_modules` is an empty list; pass None to use every LoRA layer "
                "or a list of name substrings such as ['q_proj', 'lm_head']."
            )
        return lambda name: any(s in name for s in subs)
    raise TypeError(
        "`lora_modules` must be None, a regex string, a compiled regex or a list of "
        f"name substrings; got {type(lora_modules).__name__}."
    )


def find_lora_weights(
    model: nn.Module,
    lora_modules: str | Sequence[str] | re.Pattern | None = None,
) -> list[LoRAWeight]:
    """Select the LoRA weights of the active adapters of `model`.

    Parameters
    ----------
    model : torch.nn.Module
        Any module containing PEFT LoRA layers (a `PeftModel` or a wrapper
        around one).
    lora_modules : str or list[str] or re.Pattern, optional
        Restrict to LoRA layers whose name matches: a list of substrings
        (``["lm_head"]`` gives last-layer LoRA Laplace), or a regular
        expression searched in the layer name. `None` keeps all.

    Returns
    -------
    weights : list[LoRAWeight]
        In `model.named_parameters()` order.

    Raises
    ------
    LoRALayerNotFoundError
        If the model has no LoRA layer or the filter matches none.
    UnsupportedLoRALayerError
        If a selected layer is merged, disabled, uses a LoRA variant (DoRA...)
        or is not a linear LoRA layer.
    """  # noqa: DOC502 (UnsupportedLoRALayerError: raised by _check_supported)
    match = _matcher(lora_modules)
    all_layers = lora_layer_names(model)
    if not all_layers:
        raise LoRALayerNotFoundError(
            f"{type(model).__name__} contains no PEFT LoRA layer. Wrap the model with "
            "`peft.get_peft_model(model, LoraConfig(target_modules=[...]))` before "
            "building a Laplace approximation with subset_of_weights='lora'."
        )
    selected: dict[int, tuple[str, str, str, nn.Linear]] = {}
    for layer_name, layer in model.named_modules():
        if not _is_lora_layer(layer) or not match(layer_name):
            continue
        adapters = [a for a in layer.active_adapters if a in layer.lora_A]
        for adapter in adapters:
            _check_supported(layer_name, layer, adapter)
            for kind, holder in (("A", layer.lora_A), ("B", layer.lora_B)):
                module = holder[adapter]
                selected[id(module.weight)] = (layer_name, adapter, kind, module)
    if not selected:
        raise LoRALayerNotFoundError(
            f"`lora_modules={lora_modules!r}` matched no active LoRA layer. "
            f"LoRA layers in this model: {all_layers}. Pass substrings or a regex "
            "of these names (e.g. lora_modules=['lm_head'] for last-layer LoRA)."
        )
    weights = []
    for name, param in model.named_parameters():
        if id(param) in selected:
            layer_name, adapter, kind, module = selected.pop(id(param))
            weights.append(LoRAWeight(name, layer_name, adapter, kind, module, param))
    return weights


def _check_supported(layer_name: str, layer: nn.Module, adapter: str) -> None:
    if getattr(layer, "merged", False):
        raise UnsupportedLoRALayerError(
            f"LoRA layer '{layer_name}' is merged into its base weight, so its LoRA "
            "weights take no part in the forward pass. Call `model.unmerge_adapter()` "
            "before fitting."
        )
    if getattr(layer, "disable_adapters", False):
        raise UnsupportedLoRALayerError(
            f"Adapters of LoRA layer '{layer_name}' are disabled. Enable them "
            "(`model.enable_adapter_layers()`) before fitting."
        )
    if adapter in getattr(layer, "lora_variant", {}):
        raise UnsupportedLoRALayerError(
            f"LoRA layer '{layer_name}' uses the variant "
            f"{type(layer.lora_variant[adapter]).__name__} (e.g. DoRA), which is not "
            "supported. Use plain LoRA, or exclude the layer with `lora_modules`."
        )
    for holder in (layer.lora_A, layer.lora_B):
        module = holder[adapter]
        if type(module) is not nn.Linear or module.bias is not None:
            raise UnsupportedLoRALayerError(
                f"LoRA layer '{layer_name}' is not a bias-free linear LoRA layer "
                f"({type(module).__name__}, bias={module.bias is not None}); only "
                "linear LoRA without `lora_bias` is supported. Exclude it with "
                "`lora_modules`."
            )


@contextmanager
def grad_enabled(weights: Sequence[LoRAWeight]) -> Iterator[None]:
    """Temporarily set `requires_grad=True` on the LoRA weights.

    Curvature needs gradients through the LoRA layers even when a user froze
    them after training; the flags are restored on exit, also on exceptions.
    """
    flags = [w.param.requires_grad for w in weights]
    try:
        for w in weights:
            w.param.requires_grad_(True)
        yield
    finally:
        for w, flag in zip(weights, flags, strict=True):
            w.param.requires_grad_(flag)


def lora_init(model: nn.Module, adapter: str) -> bool | str | None:
    """PEFT's ``init_lora_weights`` of `adapter` (None if no config is found).

    Read from the ``peft_config`` of the `peft.PeftModel` (or tuner model)
    inside `model`: ``True`` (the default: `lora_A` Kaiming-uniform),
    ``"gaussian"``, or a data-dependent initialisation (``"pissa"``, ...).

    Returns
    -------
    bool or str or None
        The first ``init_lora_weights`` found for `adapter`; None if no
        ``peft_config`` holds `adapter`.
    """
    for module in model.modules():
        config = getattr(module, "peft_config", None)
        if isinstance(config, dict) and adapter in config:
            return getattr(config[adapter], "init_lora_weights", None)
    return None
