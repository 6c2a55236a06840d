"""Which attention a model's forward-mode JVPs go through, switched for one call.

transformers picks a model's attention function by the name in its config
(`set_attn_implementation`, public). For a JVP this module switches it to a
tangent attention (`attention.tangent`) where that computes the model's own
eager attention, else to eager attention (SDPA and flash attention have no
forward-mode derivative), and always back afterwards, sub-model by
sub-model. The switch changes the model's config for the duration of the
call: a forward pass of the same model in another thread meanwhile would
run the tangent attention too.

The check (`matching_tangent_attention`) runs the model once with
`CHECK_NAME`: every attention call computes the model's own eager attention
(which the forward pass goes on with) and, on the same inputs in float64,
both tangent attentions and the eager attention again, and records the
largest relative difference of each tangent attention over the calls.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, PretrainedConfig, PreTrainedModel
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    AttentionMaskInterface,
)

from laplace_lora_backend.attention.tangent import (
    TANGENT_ATTENTIONS,
    UnsupportedAttentionError,
    native_tangent_attention,
    tangent_attention,
)

__all__ = [
    "CHECK_NAME",
    "CHECK_TOLERANCE",
    "attention_implementation",
    "eager_attention_of",
    "jvp_attention",
    "matching_tangent_attention",
]

CHECK_NAME = "laplace_lora_tangent_check"

CHECK_TOLERANCE = 1e-6
"""Largest relative difference, in float64 on the same inputs, between a
tangent attention and the model's eager attention that is accepted: above
the float32 rounding of a softmax (a model that takes it in float32 against
the tangent attention that does not, ~1e-7), below the effect of a different
formula (extra scaling, soft-capping: 1e-4 and more)."""

_RECORD: ContextVar[dict[str, float] | None] = ContextVar("check", default=None)


def _configs(model: nn.Module) -> list[PretrainedConfig]:
    """Every distinct config of `model` and its sub-modules.

    Returns
    -------
    list[transformers.PretrainedConfig]
    """
    found = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if isinstance(config, PretrainedConfig):
            found[id(config)] = config
    return list(found.values())


def _implementations(config: PretrainedConfig) -> str | dict:
    """The config's attention implementation and its sub-configs', nested.

    In the form `set_attn_implementation` takes.

    Returns
    -------
    str or dict
    """
    subs = {}
    for key in getattr(config, "sub_configs", {}):
        sub = getattr(config, key, None)
        if isinstance(sub, PretrainedConfig):
            subs[key] = _implementations(sub)
    own = config._attn_implementation
    return {"": own, **subs} if subs else own


@contextmanager
def attention_implementation(model: PreTrainedModel, name: str) -> Iterator[None]:
    """Switch `model`'s attention implementation, restored on exit.

    Through transformers' public `set_attn_implementation`; on exit each
    sub-config gets back its own implementation.

    Parameters
    ----------
    model : transformers.PreTrainedModel
    name : str
        E.g. ``"eager"`` or `ATTENTION_NAME`.

    Raises
    ------
    UnsupportedAttentionError
        If the model or one of its sub-models cannot switch (attention that
        does not dispatch through transformers' `AttentionInterface`).
    """
    configs = _configs(model)
    if all(c._attn_implementation == name for c in configs):
        yield
        return
    saved = _implementations(model.config)
    try:
        model.set_attn_implementation(name)
        stuck = [type(c).__name__ for c in configs if c._attn_implementation != name]
        if stuck:
            raise UnsupportedAttentionError(
                f"{type(model).__name__} cannot switch its attention to {name!r} "
                f"(stays: {stuck})."
            )
        yield
    finally:
        model.set_attn_implementation(saved)


def eager_attention_of(module: nn.Module) -> Callable | None:
    """The eager attention function of an attention layer's model family.

    transformers' convention: the modeling file that defines the layer's
    class has a module-level ``eager_attention_forward``, the default the
    layer passes to `AttentionInterface.get_interface` (pinned by
    `tests/test_upstream_api.py`).

    Returns
    -------
    callable or None
    """
    found = getattr(
        sys.modules.get(type(module).__module__), "eager_attention_forward", None
    )
    return found if callable(found) else None


def _float64(t: Any) -> Any:
    if isinstance(t, torch.Tensor) and t.is_floating_point():
        return t.double()
    return t


def _relative_error(got: torch.Tensor, reference: torch.Tensor) -> float:
    """``||got - reference|| / ||reference||``, positions NaN in both left out.

    Returns
    -------
    float
        inf for another shape or a NaN in only one of them.
    """
    if got.shape != reference.shape:
        return math.inf
    both = got.isnan() & reference.isnan()
    diff = torch.where(both, 0.0, got - reference)
    ref = torch.where(both, 0.0, reference)
    if diff.isnan().any():
        return math.inf
    return (diff.norm() / ref.norm().clamp_min(1e-300)).item()


def _checking_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *args: Any,
    **kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    """The model's eager attention, compared with both tangent attentions.

    Returns
    -------
    tuple
        The eager attention's output.

    Raises
    ------
    UnsupportedAttentionError
        Outside `matching_tangent_attention`, or for a layer without an
        eager attention function (`eager_attention_of`).
    """
    eager, record = eager_attention_of(module), _RECORD.get()
    if eager is None or record is None:
        raise UnsupportedAttentionError(f"{type(module).__name__}: no eager attention.")
    out = eager(module, query, key, value, attention_mask, *args, **kwargs)
    inputs = (query, key, value, attention_mask)
    wide = [_float64(t) for t in inputs]
    if all(w is t for w, t in zip(wide, inputs, strict=True)):
        reference = out[0]  # already float64: the same call
    else:
        reference = eager(module, *wide, *args, **kwargs)[0]
    for name, attend in zip(
        TANGENT_ATTENTIONS, (tangent_attention, native_tangent_attention), strict=True
    ):
        try:
            error = _relative_error(
                attend(module, *wide, *args, **kwargs)[0], reference
            )
        except (UnsupportedAttentionError, RuntimeError):
            error = math.inf  # refused, or inputs it cannot take
        record[name] = max(record.get(name, 0.0), error)
    return out


AttentionInterface.register(CHECK_NAME, _checking_attention)
AttentionMaskInterface.register(CHECK_NAME, ALL_MASK_ATTENTION_FUNCTIONS["eager"])


def matching_tangent_attention(
    model: PreTrainedModel, run: Callable[[], Any]
) -> str | None:
    """The tangent attention that computes `model`'s own eager attention.

    Runs `run` (e.g. the decoder on the user's batch) once without gradients
    with `CHECK_NAME` (module docstring) and keeps the tangent attention
    with the smaller largest difference, if it is within `CHECK_TOLERANCE`.

    Parameters
    ----------
    model : transformers.PreTrainedModel
    run : callable
        A forward pass of `model`.

    Returns
    -------
    str or None
        `ATTENTION_NAME` (softmax in float32, as Llama) or
        `NATIVE_ATTENTION_NAME` (as GPT-2); None when neither matches, a
        call is refused, no attention call went through transformers'
        interface, or the model cannot switch.
    """
    record: dict[str, float] = {}
    token = _RECORD.set(record)
    try:
        with torch.no_grad(), attention_implementation(model, CHECK_NAME):
            run()
    except UnsupportedAttentionError:
        return None
    finally:
        _RECORD.reset(token)
    if not record:
        return None
    name = min(record, key=record.__getitem__)
    return name if record[name] <= CHECK_TOLERANCE else None


def jvp_attention(
    model: PreTrainedModel | None, run: Callable[[], torch.Tensor]
) -> str | None:
    """The attention implementation to push forward-mode JVPs through.

    A tangent attention (closed-form tangents, `tangent_attention`) where
    one computes the model's own eager attention on `run`
    (`matching_tangent_attention`); else ``"eager"``, since SDPA and flash
    attention have no forward-mode derivative; None where the model cannot
    switch (not a transformers model, or attention that does not dispatch
    through transformers' `AttentionInterface`): it is then called as is.

    Parameters
    ----------
    model : transformers.PreTrainedModel or None
        The model (`hf_models.pretrained_model`); None for none.
    run : callable
        A forward pass of the model (or its decoder) on a user batch.

    Returns
    -------
    str or None
    """
    if model is None:
        return None
    name = matching_tangent_attention(model, run)
    if name is not None:
        return name
    try:
        with attention_implementation(model, "eager"):
            pass
    except UnsupportedAttentionError:
        return None
    return "eager"
