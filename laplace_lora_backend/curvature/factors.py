"""Accumulators that turn weighted rows into one Kronecker factor.

The backend never forms a factor itself: it hands rows (token inputs or
output gradients) to an accumulator chosen per factor side. `DenseFactor`
keeps the `d x d` Gram matrix; `LowRankAccumulator`, for very wide sides,
keeps a streaming rank-`k` factor. Both have `add(rows, weights)` and
`value(scale)`.
"""

from __future__ import annotations

import torch

from laplace_lora_backend.matrix.lowrank import LowRankFactor
from laplace_lora_backend.matrix.lowrank_options import LowRankResidual

__all__ = ["DenseFactor", "LowRankAccumulator"]


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
        """The accumulated factor times `scale`, `(d, d)`.

        Returns
        -------
        torch.Tensor
            `(d, d)`; the accumulator's own tensor (not a copy) when `scale`
            is 1.
        """
        return self.gram * scale if scale != 1.0 else self.gram


class LowRankAccumulator:
    r"""Streaming rank-`k` accumulator of :math:`\sum_n w_n x_n x_n^T`.

    Rows are buffered in chunks of `chunk` rows; each full chunk is merged
    into the running factor by a float64 thin SVD of ``[U sqrt(s), X^T]``
    (`d x (k + chunk)`) and truncated back to rank `k`. No `d x d` matrix is
    ever formed. The result is exact while the rows span at most `k`
    dimensions; the exact trace is tracked in any case.

    Parameters
    ----------
    dim : int
        Side `d` of the factor.
    rank : int
        Rank `k` kept.
    residual : LowRankResidual or str
        See `LowRankFactor`.
    dtype : torch.dtype
        dtype of the stored factor (the SVDs run in float64).
    device : torch.device
    chunk : int, optional
        Rows per SVD update; default ``max(4 * rank, 64)``.
    """

    def __init__(
        self,
        dim: int,
        rank: int,
        residual: LowRankResidual | str,
        dtype: torch.dtype,
        device: torch.device,
        chunk: int | None = None,
    ):
        self.factor = LowRankFactor.zeros(dim, rank, residual, dtype, device)
        self.chunk = chunk or max(4 * rank, 64)
        self._pending: list[torch.Tensor] = []
        self._n_pending = 0

    def add(self, rows: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Add ``rows.T @ diag(weights) @ rows``.

        Parameters
        ----------
        rows : torch.Tensor
            `(n, d)`.
        weights : torch.Tensor, optional
            `(n,)` non-negative row weights; all ones if omitted.
        """
        rows = rows.double()
        if weights is not None:
            keep = weights > 0
            rows = rows[keep] * weights[keep].double().sqrt()[:, None]
        for part in rows.split(self.chunk):
            self._pending.append(part)
            self._n_pending += part.shape[0]
            if self._n_pending >= self.chunk:
                self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        rows = torch.cat(self._pending)
        self._pending, self._n_pending = [], 0
        f = self.factor
        new = LowRankFactor.from_rows(rows, f.rank, f.residual, f.dtype)
        self.factor = f.merge(new)

    def value(self, scale: float = 1.0) -> LowRankFactor:
        """The accumulated factor times `scale`.

        Pending rows are merged first.

        Returns
        -------
        LowRankFactor
            Rank `k` (the accumulator's own factor when `scale` is 1).
        """
        self._flush()
        return self.factor * scale if scale != 1.0 else self.factor
