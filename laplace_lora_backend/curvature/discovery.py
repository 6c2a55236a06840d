"""Find the LoRA weights of a model, by module type, in parameter order.

laplace-torch selects "all weights that require grad". For Laplace-LoRA we
select the `lora_A` / `lora_B` weights of the active adapters of every PEFT
LoRA layer, whatever their `requires_grad` flag, and order them as
`model.named_parameters()` does, so that parameter vectors, samples and
Jacobian columns line up with laplace-torch's.

Heads that PEFT trains in full (``modules_to_save``, e.g. the classifier of a
``task_type="SEQ_CLS"`` model) join as ordinary linear layers: the weight and
the bias of each `nn.Linear` of the active adapter's copy. So do trainable
`nn.Linear` layers outside PEFT that `lora_modules` names.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from torch import nn

from laplace_lora_backend.errors import (
    LoRALayerNotFoundError,
    UnsupportedLoRALayerError,
)

__all__ = [
    "HEAD_KINDS",
    "LoRAWeight",
    "find_lora_weights",
    "head_names",
    "grad_enabled",
    "lora_init",
    "lora_layer_names",
]


# kinds of the weights of trainable linear heads (not LoRA factors)
HEAD_KINDS = ("head", "bias")


@dataclass(frozen=True)
class LoRAWeight:
    """One weight of the posterior and the `nn.Linear` that applies it.

    Attributes
    ----------
    name : str
        Parameter name in `model.named_parameters()`, e.g.
        ``"base_model.model.layers.0.self_attn.q_proj.lora_A.default.weight"``.
    layer_name : str
        Name of the PEFT LoRA layer holding it (``"...q_proj"``), or of the
        head's `nn.Linear`.
    adapter : str
        Adapter name (``"default"``; ``""`` for a head outside PEFT).
    kind : str
        ``"A"`` for `lora_A` (shape `(r, in_features)`), ``"B"`` for `lora_B`
        (shape `(out_features, r)`); ``"head"`` for the weight `(out, in)` of
        a trainable linear head, ``"bias"`` for its bias `(out,)`.
    module : torch.nn.Linear
        The `lora_A[adapter]` / `lora_B[adapter]` linear module, or the head.
    param : torch.nn.Parameter
        Its weight (or bias).
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
        """Columns of the weight (side of the input factor); 1 for a bias."""
        return self.param.shape[1] if self.param.ndim == 2 else 1

    @property
    def is_bias(self) -> bool:
        """Whether this is a head's bias (its layer input is a constant 1)."""
        return self.kind == "bias"

    @property
    def is_head(self) -> bool:
        """Whether this belongs to a trainable head, not to a LoRA factor."""
        return self.kind in HEAD_KINDS


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


# modules_to_save heads join by default only up to this size (a vocabulary-wide
# lm_head saved for added tokens does not: its factors would not fit)
DEFAULT_HEAD_MAX_OUT = 4096
DEFAULT_HEAD_MAX_PARAMS = 2**24


def _heads(
    model: nn.Module, match, modules_to_save: bool | None, named_only: bool
) -> tuple[dict[int, tuple[str, str, str, nn.Linear]], list[str]]:
    """Weights and biases of trainable linear heads, keyed by `id(param)`.

    `modules_to_save` copies of the active adapter (unless `modules_to_save`
    is False; with None only those up to `DEFAULT_HEAD_MAX_OUT` outputs and
    `DEFAULT_HEAD_MAX_PARAMS` weights), and trainable `nn.Linear` layers
    outside LoRA layers and PEFT wrappers (only if `named_only`:
    `lora_modules` was given). A head's linear joins if its wrapper's name or
    its own full name matches.

    Returns
    -------
    found : dict[int, tuple[str, str, str, nn.Linear]]
        `(layer_name, adapter, kind, module)` per parameter.
    too_big : list[str]
        The heads left out for their size (name and shape).
    """
    from peft.utils import ModulesToSaveWrapper

    found: dict[int, tuple[str, str, str, nn.Linear]] = {}
    skip: list[str] = []  # prefixes of LoRA layers and PEFT wrappers
    too_big: list[str] = []

    def add(name: str, adapter: str, module: nn.Linear) -> None:
        found[id(module.weight)] = (name, adapter, "head", module)
        if module.bias is not None:
            found[id(module.bias)] = (name, adapter, "bias", module)

    for name, module in model.named_modules():
        if any(name.startswith(p) for p in skip):
            continue
        if _is_lora_layer(module):
            skip.append(name + ".")
        elif isinstance(module, ModulesToSaveWrapper):
            skip.append(name + ".")
            active = module.active_adapters
            if module.disable_adapters or not active or modules_to_save is False:
                continue
            if active[0] not in module.modules_to_save:
                continue
            prefix = f"{name}.modules_to_save.{active[0]}"
            for sub, linear in module.modules_to_save[active[0]].named_modules():
                full = f"{prefix}.{sub}" if sub else prefix
                if type(linear) is not nn.Linear or not (match(name) or match(full)):
                    continue
                big = (
                    linear.out_features > DEFAULT_HEAD_MAX_OUT
                    or linear.weight.numel() > DEFAULT_HEAD_MAX_PARAMS
                )
                if modules_to_save is None and big:
                    too_big.append(f"{full} {tuple(linear.weight.shape)}")
                    continue
                add(full, active[0], linear)
        elif (
            named_only
            and type(module) is nn.Linear
            and module.weight.requires_grad
            and match(name)
        ):
            add(name, "", module)
    return found, too_big


def head_names(weights: Sequence[LoRAWeight]) -> list[str]:
    """Names of the heads among `weights`, in order, without repeats.

    Returns
    -------
    list[str]
    """
    return list(dict.fromkeys(w.layer_name for w in weights if w.is_head))


def _warn_heads(weights: Sequence[LoRAWeight], too_big: list[str], default: bool):
    """Warn about heads left out for their size, and those that joined.

    The second warning only for the `default` selection (no `lora_modules`,
    no `modules_to_save`): it tells what the posterior covers unasked.
    """
    if too_big:
        warnings.warn(
            f"Left out of the posterior: modules_to_save heads {too_big} (more than "
            f"{DEFAULT_HEAD_MAX_OUT} outputs or {DEFAULT_HEAD_MAX_PARAMS} weights; "
            "PEFT trains them in full). Pass modules_to_save=True to include them "
            "anyway (large factors), or False to silence this.",
            UserWarning,
            stacklevel=5,  # the caller of laplace.Laplace(...)
        )
    heads = head_names(weights)
    if default and heads:
        n = sum(w.is_head for w in weights)
        warnings.warn(
            f"The posterior covers the LoRA weights and {n} tensors of heads PEFT "
            f"trains in full (modules_to_save): {heads}. Pass modules_to_save=True "
            "to silence this, or modules_to_save=False to leave them out.",
            UserWarning,
            stacklevel=5,  # the caller of laplace.Laplace(...)
        )


def find_lora_weights(
    model: nn.Module,
    lora_modules: str | Sequence[str] | re.Pattern | None = None,
    modules_to_save: bool | None = None,
    warn: bool = False,
) -> list[LoRAWeight]:
    """Select the LoRA weights of the active adapters of `model`, and its heads.

    Parameters
    ----------
    model : torch.nn.Module
        Any module containing PEFT LoRA layers (a `PeftModel` or a wrapper
        around one).
    lora_modules : str or list[str] or re.Pattern, optional
        Restrict to layers whose name matches: a list of substrings
        (``["lm_head"]`` gives last-layer LoRA Laplace, ``["classifier"]``
        last-layer Laplace on a sequence-classification head), or a regular
        expression searched in the layer name. `None` keeps all LoRA layers
        and the ``modules_to_save`` heads. A trainable `nn.Linear` outside
        PEFT joins when its name matches (not with `None`).
    modules_to_save : bool or None, default=None
        Whether PEFT's ``modules_to_save`` heads (trained in full) join the
        posterior: their `nn.Linear` weights and biases. `None`: those up to
        `DEFAULT_HEAD_MAX_OUT` outputs and `DEFAULT_HEAD_MAX_PARAMS` weights.
    warn : bool, default=False
        Warn about heads left out for their size and, when both selections
        are None, name the heads that joined (once, where the posterior is
        built; not on every later lookup).

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
            f"{getattr(model, 'display_name', type(model).__name__)} contains no "
            "PEFT LoRA layer. Wrap the model with "
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
    heads, too_big = _heads(model, match, modules_to_save, lora_modules is not None)
    selected.update(heads)
    if not selected:
        raise LoRALayerNotFoundError(
            f"`lora_modules={lora_modules!r}` matched no active LoRA layer or "
            f"trainable linear head. LoRA layers in this model: {all_layers}. Pass "
            "substrings or a regex of these names (e.g. lora_modules=['lm_head'] "
            "for last-layer LoRA)."
        )
    weights = []
    for name, param in model.named_parameters():
        if id(param) in selected:
            layer_name, adapter, kind, module = selected.pop(id(param))
            weights.append(LoRAWeight(name, layer_name, adapter, kind, module, param))
    if warn:
        _warn_heads(weights, too_big, modules_to_save is None and lora_modules is None)
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
