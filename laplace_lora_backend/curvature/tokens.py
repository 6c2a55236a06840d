"""How token positions become rows of a Kronecker factor.

A LoRA linear sees `(batch, tokens, features)` inputs in a transformer: its
weight is shared over token positions. K-FAC treats that sharing in one of two
ways (Eschenhagen et al., 2023), selected by `kfac_approx`:

- ``"expand"``: every (non-padding) token is a sample. Input factor rows are
  the token inputs weighted by `1 / T_n` (T_n = number of real tokens of
  example n), gradient factor rows are the token output-gradients.
- ``"reduce"``: one row per example. The input row is the mean over real
  tokens, the gradient row the sum over real tokens.

Without padding both equal Curvlinops' `KFACLinearOperator` (laplace-torch's
default backend). With padding, positions where `attention_mask == 0` are left
out; Curvlinops keeps them. Our factors then equal Curvlinops' run on each
example without its padding (tested).
"""

from __future__ import annotations

from enum import Enum

import torch

__all__ = ["KFACApprox", "parse_kfac_approx", "token_rows", "per_example_view"]


class KFACApprox(str, Enum):
    """Token aggregation of K-FAC for weight-shared (sequence) inputs."""

    EXPAND = "expand"
    REDUCE = "reduce"


def parse_kfac_approx(value: KFACApprox | str) -> KFACApprox:
    """Validate a `kfac_approx` option.

    Returns
    -------
    KFACApprox

    Raises
    ------
    ValueError
        If `value` is not ``"expand"`` or ``"reduce"``.
    """
    try:
        return KFACApprox(value)
    except ValueError:
        raise ValueError(
            f"Unknown kfac_approx={value!r}. Use 'expand' (every real token is a "
            "sample) or 'reduce' (one sample per sequence), e.g. "
            "backend_kwargs={'kfac_approx': 'expand'}."
        ) from None


def _token_mask(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    """The `(batch, tokens)` mask that applies to `x`, or None if all count.

    Returns
    -------
    torch.Tensor or None
        `mask` in the dtype of `x`; None without a mask, for inputs that are
        not `(batch, tokens, d)` or whose token count differs from the mask's.

    Raises
    ------
    ValueError
        If the batch sizes of `x` and `mask` differ.
    """
    if mask is None or x.ndim != 3:
        return None
    if x.shape[1] != mask.shape[1]:
        # e.g. lm_head applied to the last position only (logits_to_keep=1)
        return None
    if x.shape[0] != mask.shape[0]:
        raise ValueError(
            f"attention_mask has batch size {mask.shape[0]} but a LoRA layer input "
            f"has {x.shape[0]}; pass the mask that belongs to the batch."
        )
    return mask.to(dtype=x.dtype)


def per_example_view(x: torch.Tensor) -> torch.Tensor:
    """View `(batch, *shared, d)` as `(batch, positions, d)`.

    Parameters
    ----------
    x : torch.Tensor
        `(batch, d)` or `(batch, *shared, d)`.

    Returns
    -------
    x : torch.Tensor
        `(batch, positions, d)`.
    """
    return x.reshape(x.shape[0], -1, x.shape[-1])


def token_rows(
    x: torch.Tensor,
    mask: torch.Tensor | None,
    approx: KFACApprox,
    is_input: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows and row weights whose weighted Gram matrix is this batch's factor.

    The factor contribution is ``rows.T @ (weights[:, None] * rows)``
    (`weights=None` means all ones). Input factors still have to be divided by
    the data set size `N` (laplace-torch's convention: input factor averaged,
    gradient factor summed).

    Parameters
    ----------
    x : torch.Tensor
        Layer input `(batch, *shared, in)` if `is_input`, else output gradient
        `(batch, *shared, out)`.
    mask : torch.Tensor or None
        `(batch, tokens)` attention mask, 1 for real tokens.
    approx : KFACApprox
    is_input : bool

    Returns
    -------
    rows : torch.Tensor
        `(n_rows, d)`.
    weights : torch.Tensor or None
        `(n_rows,)`.
    """
    m = _token_mask(x, mask)
    x3 = per_example_view(x)
    if m is None:
        m = x3.new_ones(x3.shape[:2])
    n_tokens = m.sum(1).clamp_min(1.0)  # (batch,)
    if approx == KFACApprox.EXPAND:
        rows = x3.reshape(-1, x3.shape[-1])
        if is_input:
            weights = (m / n_tokens[:, None]).reshape(-1)
        else:
            weights = m.reshape(-1)
        return rows, weights
    summed = torch.einsum("bt,btd->bd", m, x3)
    if is_input:
        return summed / n_tokens[:, None], None
    return summed, None
