"""Accumulators that turn weighted rows into one Kronecker factor.

The backend never forms a factor itself: it hands rows (token inputs or
output gradients) to an accumulator chosen per factor side. `DenseFactor`
keeps the `d x d` Gram matrix; a low-rank accumulator for very wide sides
implements the same two methods.
"""

from __future__ import annotations

import torch

__all__ = ["DenseFactor"]


class DenseFactor:
    r"""Dense accumulator of :math:`\sum_n w_n x_n x_n^T`.

    Parameters
    ----------
    dim : int
        Side `d` of the factor.
    dtype : torch.dtype
        Accumulation dtype.
    device : torch.device
    """

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device):
        self.gram = torch.zeros(dim, dim, dtype=dtype, device=device)

    def add(self, rows: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Add ``rows.T @ diag(weights) @ rows``.

        Parameters
        ----------
        rows : torch.Tensor
            `(n, d)`.
        weights : torch.Tensor, optional
            `(n,)` non-negative row weights; all ones if omitted.
        """
        rows = rows.to(self.gram.dtype)
        weighted = rows if weights is None else rows * weights.to(rows.dtype)[:, None]
        self.gram.addmm_(rows.T, weighted)

    def value(self, scale: float = 1.0) -> torch.Tensor:
        """The accumulated factor times `scale`, `(d, d)`."""
        return self.gram * scale if scale != 1.0 else self.gram
