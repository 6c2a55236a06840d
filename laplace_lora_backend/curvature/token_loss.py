"""The next-token loss of a causal LM: every position with a target is a sample.

A causal LM returns `(batch, tokens, vocab)` logits; its language-modelling
loss is the cross-entropy of the next token summed over every position that
has one. Targets are `(batch, tokens)` token ids ALIGNED with the logits
(the target of position `t` is the token at `t + 1`, see
`next_token_labels`), with ``IGNORE_INDEX`` (-100, transformers' convention)
where there is none: the last position and padding.

The LoRA backend uses these for K-FAC (``kfac_approx="expand"``: every real
token is a row of both factors), the empirical Fisher (the true next tokens)
and the Monte-Carlo Fisher (one label drawn from the model's softmax at every
position with a target, independently: its expectation is the GGN, whose
output factor is ``sum_{s, c} g_{s,c} g_{s,c}^T`` over positions `s` and
columns `c` of the loss Hessian's square root at `s`). The exact GGN is
refused: a pass per class over all positions at once, as for classification,
would add cross-position terms; per position it needs ``tokens * V``
backward passes (49152 per token for SmolLM2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "IGNORE_INDEX",
    "EXACT_GGN_OF_TOKENS",
    "check_index_rank",
    "check_token_targets",
    "checked_mask",
    "next_token_labels",
    "sample_token_labels",
    "target_mask",
    "token_cross_entropy",
]

IGNORE_INDEX = -100
EXACT_GGN_OF_TOKENS = (
    "The exact GGN of (batch, tokens, vocab) logits needs one backward pass per "
    "position and vocabulary entry. Fit a causal LM with the Monte-Carlo Fisher "
    "(backend_kwargs={'stochastic': True}, sampled labels) or the empirical "
    "Fisher (backend=LoRAEF, the true next tokens)."
)


def checked_mask(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """The attention mask of `(batch, tokens)` ids, checked (default all ones).

    Returns
    -------
    torch.Tensor
        `(batch, tokens)`.

    Raises
    ------
    ValueError
        If `input_ids` is not `(batch, tokens)` or the mask's shape differs.
    """
    if input_ids.ndim != 2:
        raise ValueError(
            f"input_ids must be (batch, tokens), got {tuple(input_ids.shape)}; "
            "add a batch axis with input_ids[None]."
        )
    if attention_mask is None:
        return torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask {tuple(attention_mask.shape)} must have the shape of "
            f"input_ids {tuple(input_ids.shape)}."
        )
    return attention_mask


def next_token_labels(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Targets aligned with the logits: the next real token, else -100.

    Parameters
    ----------
    input_ids : torch.Tensor
        `(batch, tokens)` token ids.
    attention_mask : torch.Tensor, optional
        `(batch, tokens)`, 1 for real tokens (left or right padding).

    Returns
    -------
    torch.Tensor
        `(batch, tokens)` int64: ``input_ids[:, t + 1]`` where positions `t`
        and `t + 1` are both real, ``IGNORE_INDEX`` elsewhere (the last
        position and padding).

    Raises
    ------
    ValueError
        If `input_ids` is not `(batch, tokens)` or the mask's shape differs.
    """  # noqa: DOC502 (raised by checked_mask)
    real = checked_mask(input_ids, attention_mask).bool()
    labels = torch.full_like(input_ids, IGNORE_INDEX, dtype=torch.long)
    both = real[:, :-1] & real[:, 1:]
    labels[:, :-1] = torch.where(both, input_ids[:, 1:].long(), IGNORE_INDEX)
    return labels


def target_mask(y: torch.Tensor) -> torch.Tensor:
    """`(batch, tokens)` bool: positions that have a target.

    Returns
    -------
    torch.Tensor
        ``y != IGNORE_INDEX``.
    """
    return y != IGNORE_INDEX


def check_index_rank(f: torch.Tensor, y: torch.Tensor) -> None:
    """Integer targets have one axis less than the outputs.

    Parameters
    ----------
    f : torch.Tensor
        `(batch, C)` outputs or `(batch, tokens, V)` logits.
    y : torch.Tensor
        Targets (floating-point targets pass).

    Raises
    ------
    ValueError
        For class indices `(batch, k)` with `(batch, C)` outputs, or
        `(batch,)` with token logits.
    """
    if y.is_floating_point() or y.ndim == f.ndim - 1:
        return
    raise ValueError(
        f"Targets of shape {tuple(y.shape)} do not fit model outputs of shape "
        f"{tuple(f.shape)}: class indices have shape (batch,) with (batch, "
        "outputs) outputs (wrap a causal LM to return its answer-token logits, "
        "see laplace_lora_backend.llm); next-token ids (batch, tokens) with "
        "(batch, tokens, vocab) logits (next_token_labels)."
    )


def check_token_targets(f: torch.Tensor, y: torch.Tensor) -> None:
    """Targets of a batch of token logits: `(batch, tokens)` ids in `[0, V)`.

    Parameters
    ----------
    f : torch.Tensor
        `(batch, tokens, V)` logits.
    y : torch.Tensor
        Targets, `IGNORE_INDEX` where none.

    Raises
    ------
    ValueError
        If the shapes do not match or a target lies outside `[0, V)`.
    TypeError
        If the targets are not integers.
    """
    if y.is_floating_point():
        raise TypeError(
            f"Next-token targets must be int64 token ids, got {y.dtype}; use "
            "next_token_labels(input_ids, attention_mask)."
        )
    if y.shape != f.shape[:2]:
        raise ValueError(
            f"The model returns (batch, tokens, vocab) logits {tuple(f.shape)}, so "
            f"the targets must be (batch, tokens) = {tuple(f.shape[:2])} token ids "
            f"aligned with the logits, got {tuple(y.shape)}. Build them with "
            "next_token_labels(input_ids, attention_mask)."
        )
    real = y[target_mask(y)]
    if real.numel() and (int(real.min()) < 0 or int(real.max()) >= f.shape[-1]):
        raise ValueError(
            f"Next-token targets must lie in [0, {f.shape[-1]}) or be "
            f"{IGNORE_INDEX}, got values in [{int(real.min())}, {int(real.max())}]."
        )


def token_cross_entropy(f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over every position with a target.

    Parameters
    ----------
    f : torch.Tensor
        `(batch, tokens, V)` logits.
    y : torch.Tensor
        `(batch, tokens)` targets, `IGNORE_INDEX` where none.

    Returns
    -------
    torch.Tensor
        Scalar.
    """
    check_token_targets(f, y)
    return F.cross_entropy(
        f.flatten(0, 1), y.flatten().long(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def sample_token_labels(f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One label per position drawn from ``softmax(f)`` (MC Fisher).

    Uses the global torch RNG, as the classification MC Fisher does.

    Parameters
    ----------
    f : torch.Tensor
        `(batch, tokens, V)` logits.
    y : torch.Tensor
        `(batch, tokens)` true targets: only their `IGNORE_INDEX` entries
        matter (no label is drawn there).

    Returns
    -------
    torch.Tensor
        `(batch, tokens)` int64.
    """
    with torch.no_grad():
        probs = f.detach().flatten(0, 1).softmax(-1)
        drawn = torch.multinomial(probs, 1).view(y.shape)
    return torch.where(target_mask(y), drawn, IGNORE_INDEX)
