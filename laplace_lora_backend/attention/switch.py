"""Which attention a model's forward-mode JVPs go through, switched for one call.

transformers picks a model's attention function by the name in its config
(`set_attn_implementation`, public). For a JVP this module switches it to a
tangent attention (`attention.tangent`) where that reproduces the model's
own eager attention, else to eager attention (SDPA and flash attention have
no forward-mode derivative), and always back afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from transformers import PreTrainedModel

from laplace_lora_backend.attention.tangent import (
    TANGENT_ATTENTIONS,
    UnsupportedAttentionError,
)

__all__ = ["attention_implementation", "jvp_attention", "matching_tangent_attention"]


@contextmanager
def attention_implementation(model: PreTrainedModel, name: str) -> Iterator[None]:
    """Switch `model`'s attention implementation, restored on exit.

    Through transformers' public `set_attn_implementation` (the model and
    every sub-model sharing or nesting its config).

    Parameters
    ----------
    model : transformers.PreTrainedModel
    name : str
        E.g. ``"eager"`` or `ATTENTION_NAME`.

    Raises
    ------
    UnsupportedAttentionError
        If the model cannot switch (its attention does not dispatch through
        transformers' `AttentionInterface`); nothing is changed then.
    """
    before = model.config._attn_implementation
    if before == name:
        yield
        return
    model.set_attn_implementation(name)
    try:
        if model.config._attn_implementation != name:
            raise UnsupportedAttentionError(
                f"{type(model).__name__} cannot switch its attention to {name!r}."
            )
        yield
    finally:
        model.set_attn_implementation(before)


def matching_tangent_attention(
    model: PreTrainedModel, run: Callable[[], torch.Tensor]
) -> str | None:
    """The tangent attention that computes `model`'s own eager attention.

    Runs `run` (e.g. the decoder on the user's batch) without gradients with
    the model's eager attention and with each tangent attention (one where
    both softmax precisions coincide, i.e. float32 models), and keeps the
    closest, if within ``max(1e-5, 16 eps)`` of the output's norm (blocks
    and grouped heads change the order of the sums; a different formula,
    e.g. soft-capping or extra scaling, changes the output at order one).

    Parameters
    ----------
    model : transformers.PreTrainedModel
    run : callable
        Returns a floating-point tensor computed by `model`.

    Returns
    -------
    str or None
        `ATTENTION_NAME` or `NATIVE_ATTENTION_NAME`; None when no tangent
        attention matches, a call is refused (`UnsupportedAttentionError`)
        or the model cannot switch.
    """
    errors = {}
    try:
        with torch.no_grad():
            with attention_implementation(model, "eager"):
                reference = run().double()
            for name in TANGENT_ATTENTIONS:
                with attention_implementation(model, name):
                    got = run()
                if got.shape == reference.shape:
                    errors[name] = (got.double() - reference).norm().item()
                if got.dtype == torch.float32:
                    break  # both softmax precisions are the same computation
    except UnsupportedAttentionError:
        return None
    if not errors:
        return None
    name = min(errors, key=errors.__getitem__)
    tol = max(1e-5, 16 * torch.finfo(got.dtype).eps) * reference.norm().item()
    return name if errors[name] <= tol else None


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
