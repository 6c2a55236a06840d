r"""Attention with a hand-written forward-mode derivative, for decoder JVPs.

The linearised next-token predictive (`next_token`) pushes `K` posterior
directions through the decoder by forward-mode AD. Through transformers'
eager attention that costs far more than the `K` extra passes of the linear
layers: autograd's tangent of ``softmax(q k^T s + mask) v`` copies and
multiplies batched `(K, batch, heads, T, T)` tensors op by op (SmolLM2, 512
tokens: about 18 forward passes for the decoder JVP along 10 directions),
and SDPA has no forward-mode derivative at all.

`tangent_attention` computes the same attention as transformers'
``eager_attention_forward`` (Llama and the families that share it) as one
`torch.autograd.Function` whose `jvp` is the closed form, block by block of
query rows:

.. math::

    S = s\, q k^T + M, \quad P = \mathrm{softmax}(S), \quad O = P v,

    \dot S = s (\dot q k^T + q \dot k^T), \quad
    \dot P = P \odot (\dot S - \mathrm{rowsum}(P \odot \dot S)), \quad
    \dot O = \dot P v + P \dot v,

with the grouped key/value heads of GQA used in place (no `repeat_kv` copy)
and the softmax and its tangent either in float32 whatever the input's dtype
(Llama's eager attention, `ATTENTION_NAME`) or in the input's dtype (GPT-2's,
`NATIVE_ATTENTION_NAME`). A block holds about `TANGENT_BLOCK_BYTES` of score
tangents whatever the length, so memory grows
linearly in `T` (the primal scores of a block are recomputed in `jvp`, never
stored for the whole sequence). The vectorisation over the `K` directions is
`torch.func.vmap`'s (``generate_vmap_rule``).

Both are registered with transformers' `AttentionInterface` (and the eager
mask with `AttentionMaskInterface`) when this module is imported, and
switched on only for the duration of a JVP (`attention.switch`), after a
check against the model's own eager attention on the user's batch. A call
with options they do not reproduce (no `scaling`, dropout while training,
soft-capping, attention sinks, any unknown keyword but a flag) raises
`UnsupportedAttentionError`, and the model is then linearised through its
eager attention instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    AttentionMaskInterface,
)

__all__ = [
    "ATTENTION_NAME",
    "NATIVE_ATTENTION_NAME",
    "TANGENT_ATTENTIONS",
    "TANGENT_BLOCK_BYTES",
    "UnsupportedAttentionError",
    "native_tangent_attention",
    "tangent_attention",
    "tangent_directions",
]

ATTENTION_NAME = "laplace_lora_tangent"
"""`tangent_attention`: softmax in float32 (Llama's eager)."""

NATIVE_ATTENTION_NAME = "laplace_lora_tangent_native"
"""`native_tangent_attention`: softmax in the input's dtype (GPT-2's eager)."""

TANGENT_ATTENTIONS = (ATTENTION_NAME, NATIVE_ATTENTION_NAME)

TANGENT_BLOCK_BYTES = 4 * 2**20
"""Score tangents of one block of query rows, ``K * batch * heads * rows *
T`` float32 entries: small enough to stay in cache, large enough for
efficient products (SmolLM2, 10 directions: 91 rows at 128 tokens, 22 at
512. Measured while building it, SmolLM2 at 512 tokens: the decoder JVP
took 17.0 forward passes with whole-sequence blocks, 12.0-12.6 with blocks
of 16 to 128 rows)."""

# Keyword arguments of an attention call that do not change eager attention
# (the mask already holds causality and sliding windows). Any other keyword
# with a value other than a flag (bool) is refused: numbers and tensors are
# how attention options arrive (Gemma-2's `softcap`, gpt-oss's `s_aux`),
# flags are the model's output switches (`output_router_logits`).
NEUTRAL_KEYWORDS = frozenset(
    {
        "cache",
        "cache_position",
        "is_causal",
        "output_attentions",
        "past_key_value",
        "past_key_values",
        "position_embeddings",
        "position_ids",
        "sliding_window",
        "use_cache",
    }
)

_DIRECTIONS: ContextVar[int] = ContextVar("tangent_directions", default=1)


class UnsupportedAttentionError(RuntimeError):
    """An attention call `tangent_attention` does not reproduce exactly."""


@contextmanager
def tangent_directions(n: int) -> Iterator[None]:
    """Declare that `n` directions are pushed at once (sizes the row blocks).

    Parameters
    ----------
    n : int
        Directions of the vectorised JVP.
    """
    token = _DIRECTIONS.set(max(1, int(n)))
    try:
        yield
    finally:
        _DIRECTIONS.reset(token)


def rows_per_block(batch: int, heads: int, keys: int, directions: int) -> int:
    """Query rows per block so the block's score tangents fit the budget.

    Returns
    -------
    int
        At least 1.
    """
    per_row = max(1, directions * batch * heads * keys * 4)
    return max(1, TANGENT_BLOCK_BYTES // per_row)


def _grouped(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """`(b, h, T, d)` query-shaped tensor as `(b, kv_heads, g * T, d)`.

    Query head ``j`` attends with key/value head ``j // g`` (transformers'
    `repeat_kv` order), so the `g` heads of a group stack their rows.

    Returns
    -------
    torch.Tensor
    """
    b, h, t, d = x.shape
    return x.reshape(b, kv_heads, (h // kv_heads) * t, d)


def _block_mask(
    mask: torch.Tensor | None, rows: slice, kv_heads: int, groups: int
) -> torch.Tensor | None:
    """The mask's rows of a block, broadcastable to `(b, kv, g, rows, Tk)`.

    Returns
    -------
    torch.Tensor or None
    """
    if mask is None:
        return None
    m = mask if mask.shape[2] == 1 else mask[:, :, rows]  # broadcast queries
    if m.shape[1] == 1:
        return m.unsqueeze(2)
    return m.reshape(m.shape[0], kv_heads, groups, m.shape[2], m.shape[3])


def _block_probs(
    q: torch.Tensor,
    k_t: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    rows: slice,
    softmax_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Query rows of a block, `(b, kv, g * r, d)`, and their softmax.

    Returns
    -------
    q_rows : torch.Tensor
    probs : torch.Tensor
        `(b, kv, g, r, Tk)`, in `softmax_dtype`.
    """
    b, h, _, d = q.shape
    kv = k_t.shape[1]
    q_rows = _grouped(q[:, :, rows], kv)
    scores = (q_rows @ k_t).mul_(scaling).view(b, kv, h // kv, -1, k_t.shape[-1])
    m = _block_mask(mask, rows, kv, h // kv)
    if m is not None:
        scores = scores + m
    return q_rows, scores.softmax(-1, dtype=softmax_dtype)


class _Attention(torch.autograd.Function):
    """``softmax(s q k^T + mask) v`` with a closed-form JVP (module docstring)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
        scaling: float,
        rows: int,
        softmax_dtype: torch.dtype,
    ) -> torch.Tensor:
        b, h, t, _ = q.shape
        kv = k.shape[1]
        k_t = k.transpose(-1, -2)
        out = []
        for start in range(0, t, rows):
            block = slice(start, start + rows)
            _, p = _block_probs(q, k_t, mask, scaling, block, softmax_dtype)
            p = p.to(q.dtype).view(b, kv, -1, k.shape[-2])
            out.append((p @ v).view(b, h, -1, v.shape[-1]))
        return torch.cat(out, 2)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        q, k, v, mask, scaling, rows, softmax_dtype = inputs
        ctx.save_for_forward(q, k, v, mask)
        ctx.scaling, ctx.rows, ctx.softmax_dtype = scaling, rows, softmax_dtype

    @staticmethod
    def jvp(
        ctx: Any,
        dq: torch.Tensor | None,
        dk: torch.Tensor | None,
        dv: torch.Tensor | None,
        *_: Any,
    ) -> torch.Tensor:
        q, k, v, mask = ctx.saved_tensors
        b, h, t, _ = q.shape
        kv = k.shape[1]
        k_t = k.transpose(-1, -2)
        out = []
        for start in range(0, t, ctx.rows):
            block = slice(start, start + ctx.rows)
            q_rows, p = _block_probs(
                q, k_t, mask, ctx.scaling, block, ctx.softmax_dtype
            )
            shape = p.shape
            d_out = None
            d_scores = None
            if dq is not None:
                d_scores = _grouped(dq[:, :, block], kv) @ k_t
            if dk is not None:
                term = q_rows @ dk.transpose(-1, -2)
                d_scores = term if d_scores is None else d_scores + term
            if d_scores is not None:
                ds = (d_scores * ctx.scaling).view(shape).to(p.dtype)
                dp = p * (ds - (p * ds).sum(-1, keepdim=True))
                d_out = dp.to(q.dtype).view(b, kv, -1, shape[-1]) @ v
            if dv is not None:
                term = p.to(q.dtype).view(b, kv, -1, shape[-1]) @ dv
                d_out = term if d_out is None else d_out + term
            if d_out is None:
                d_out = q.new_zeros(b, kv, shape[2] * shape[3], v.shape[-1])
            out.append(d_out.view(b, h, -1, v.shape[-1]))
        return torch.cat(out, 2)


def _attention(
    float32_softmax: bool,
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    dropout: float,
    kwargs: dict[str, Any],
) -> tuple[torch.Tensor, None]:
    """`tangent_attention` (`float32_softmax`) or `native_tangent_attention`.

    Returns
    -------
    tuple
        `(batch, Tq, heads, d)` output and None.

    Raises
    ------
    UnsupportedAttentionError
        For a call it does not reproduce exactly (`tangent_attention`).
    """
    extra = sorted(
        k
        for k, v in kwargs.items()
        if v is not None and not isinstance(v, bool) and k not in NEUTRAL_KEYWORDS
    )
    if scaling is None or (dropout and module.training) or extra:
        raise UnsupportedAttentionError(
            f"{type(module).__name__}: scaling={scaling}, dropout={dropout}, "
            f"training={module.training}, other options {extra}."
        )
    if query.shape[1] % key.shape[1]:
        raise UnsupportedAttentionError(
            f"{query.shape[1]} query heads for {key.shape[1]} key/value heads."
        )
    b, h, _, _ = query.shape
    rows = rows_per_block(b, h, key.shape[-2], _DIRECTIONS.get())
    dtype = torch.float32 if float32_softmax else query.dtype
    out = _Attention.apply(
        query, key, value, attention_mask, float(scaling), rows, dtype
    )
    return out.transpose(1, 2).contiguous(), None


def tangent_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Llama's eager attention with a closed-form forward derivative.

    The signature of transformers' attention functions; the softmax in
    float32 whatever the input's dtype, as Llama's.

    Parameters
    ----------
    module : torch.nn.Module
        The attention layer (read: `training`).
    query : torch.Tensor
        `(batch, heads, Tq, d)`.
    key, value : torch.Tensor
        `(batch, kv_heads, Tk, d)`, `kv_heads` dividing `heads`.
    attention_mask : torch.Tensor or None
        Additive, broadcastable to `(batch, heads, Tq, Tk)`.
    scaling : float
    dropout : float, default=0.0

    Returns
    -------
    attn_output : torch.Tensor
        `(batch, Tq, heads, d)`.
    attn_weights : None

    Notes
    -----
    Refused with `UnsupportedAttentionError` (by `_attention`): no
    `scaling`, dropout in training mode, or a keyword argument outside
    `NEUTRAL_KEYWORDS` whose value is neither None nor a bool (e.g.
    Gemma-2's `softcap`, gpt-oss's `s_aux`).
    """
    return _attention(
        True, module, query, key, value, attention_mask, scaling, dropout, kwargs
    )


def native_tangent_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """`tangent_attention` with the softmax in the input's dtype (GPT-2's).

    Returns
    -------
    attn_output : torch.Tensor
        `(batch, Tq, heads, d)`.
    attn_weights : None
    """
    return _attention(
        False, module, query, key, value, attention_mask, scaling, dropout, kwargs
    )


for _name, _function in zip(
    TANGENT_ATTENTIONS, (tangent_attention, native_tangent_attention), strict=True
):
    AttentionInterface.register(_name, _function)
    AttentionMaskInterface.register(_name, ALL_MASK_ATTENTION_FUNCTIONS["eager"])
