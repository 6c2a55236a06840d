r"""Low-rank-plus-isotropic Kronecker factor for very wide LoRA sides.

A factor :math:`F \approx U \operatorname{diag}(s) U^T + c I` of side `d`, with
`U` `(d, k)` orthonormal, `s` `(k,)` non-negative, `c >= 0`. It is already in
eigen form: `U` are eigenvectors with eigenvalues `s + c`, and every direction
orthogonal to `U` has eigenvalue `c`. `U_perp` is never stored.

`trace` is the exact trace of the factor it approximates (the sum of squared
row norms ever added), so the mass that truncation discards,
``trace - s.sum()``, is known exactly. With ``residual="trace"`` it is spread
evenly as ``c = (trace - s.sum()) / d`` (the trace is preserved); with
``residual="none"``, ``c = 0`` and those directions fall back to the prior.
"""

from __future__ import annotations

import torch

from laplace_lora_backend.matrix.lowrank_options import (
    LowRankResidual,
    parse_residual,
)

__all__ = ["LowRankFactor"]


class LowRankFactor:
    r"""Symmetric PSD factor :math:`U \operatorname{diag}(s) U^T + c I`.

    Parameters
    ----------
    U : torch.Tensor
        `(d, k)` with orthonormal columns.
    s : torch.Tensor
        `(k,)` non-negative, descending.
    trace : torch.Tensor or float
        Trace of the exact factor this approximates (>= ``s.sum()``).
    rank : int
        Maximum rank `k` kept by `merge`.
    residual : LowRankResidual or str
        ``"trace"``: ``c = (trace - s.sum()) / d``; ``"none"``: ``c = 0``.
    """

    def __init__(
        self,
        U: torch.Tensor,
        s: torch.Tensor,
        trace: torch.Tensor | float,
        rank: int,
        residual: LowRankResidual | str = LowRankResidual.TRACE,
    ) -> None:
        if U.ndim != 2 or s.ndim != 1 or U.shape[1] != s.shape[0]:
            raise ValueError(f"U {tuple(U.shape)} and s {tuple(s.shape)} mismatch.")
        self.U = U
        self.s = s
        self.trace = torch.as_tensor(trace, dtype=s.dtype, device=s.device)
        self.rank = int(rank)
        self.residual = parse_residual(residual)

    # -------------------------------------------------------------- creation
    @classmethod
    def zeros(
        cls,
        dim: int,
        rank: int,
        residual: LowRankResidual | str,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> LowRankFactor:
        """The zero factor of side `dim` (rank 0).

        Returns
        -------
        LowRankFactor
            `U` `(dim, 0)`, `s` `(0,)`, trace 0.
        """
        return cls(
            torch.zeros(dim, 0, dtype=dtype, device=device),
            torch.zeros(0, dtype=dtype, device=device),
            0.0,
            rank,
            residual,
        )

    @classmethod
    def from_rows(
        cls,
        rows: torch.Tensor,
        rank: int,
        residual: LowRankResidual | str,
        dtype: torch.dtype,
    ) -> LowRankFactor:
        """Truncated factor of ``rows.T @ rows`` (float64 SVD), `rows` `(n, d)`.

        Returns
        -------
        LowRankFactor
            Rank at most `rank`, in `dtype`, with the exact trace.
        """
        U, s = _truncated_eig_of_gram(rows.T, rank)
        trace = rows.double().square().sum()
        return cls(U.to(dtype), s.to(dtype), trace.to(dtype), rank, residual)

    # ------------------------------------------------------------ properties
    @property
    def dim(self) -> int:
        """Side `d` of the factor."""
        return self.U.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        """Data type of `U` and `s`."""
        return self.U.dtype

    @property
    def device(self) -> torch.device:
        """Device of `U` and `s`."""
        return self.U.device

    @property
    def c(self) -> torch.Tensor:
        """Isotropic residual `c` (0-dim tensor)."""
        if self.residual == LowRankResidual.NONE:
            return torch.zeros((), dtype=self.s.dtype, device=self.s.device)
        return (self.trace - self.s.sum()).clamp_min(0.0) / self.dim

    @property
    def discarded_trace(self) -> torch.Tensor:
        """Trace mass that truncation removed from the low-rank part."""
        return (self.trace - self.s.sum()).clamp_min(0.0)

    def __len__(self) -> int:
        return self.dim

    @property
    def shape(self) -> torch.Size:
        """`(d, d)`, as for a dense factor."""
        return torch.Size((self.dim, self.dim))

    def numel_stored(self) -> int:
        """Numbers stored (U, s, trace), for memory accounting.

        Returns
        -------
        int
        """
        return self.U.numel() + self.s.numel() + 1

    # ------------------------------------------------------------ arithmetic
    def merge(self, other: LowRankFactor) -> LowRankFactor:
        """Sum of two factors, re-truncated to `rank` (float64 SVD).

        Returns
        -------
        LowRankFactor
            A new factor of rank at most ``max(self.rank, other.rank)``; the
            traces add exactly.

        Raises
        ------
        ValueError
            If `other` is not a `LowRankFactor` of the same side.
        """
        if not isinstance(other, LowRankFactor) or other.dim != self.dim:
            raise ValueError("Can only add low-rank factors of the same side.")
        if other.s.numel() == 0:
            return self._with(self.U, self.s, self.trace + other.trace)
        if self.s.numel() == 0:
            return self._with(other.U, other.s, self.trace + other.trace)
        M = torch.cat(
            [
                self.U * self.s.clamp_min(0).sqrt(),
                other.U * other.s.clamp_min(0).sqrt(),
            ],
            dim=1,
        )
        U, s = _truncated_eig_of_gram(M, max(self.rank, other.rank))
        return self._with(U.to(self.dtype), s.to(self.dtype), self.trace + other.trace)

    def _with(self, U, s, trace) -> LowRankFactor:
        return LowRankFactor(U, s, trace, self.rank, self.residual)

    def __add__(self, other: LowRankFactor) -> LowRankFactor:
        return self.merge(other)

    def add(self, other: LowRankFactor) -> LowRankFactor:
        """Alias of `merge` (laplace's `Kron.__add__` calls ``F.add(G)``).

        Returns
        -------
        LowRankFactor
        """
        return self.merge(other)

    def __mul__(self, scalar: float | torch.Tensor) -> LowRankFactor:
        return self._with(self.U, self.s * scalar, self.trace * scalar)

    __rmul__ = __mul__

    # ----------------------------------------------------------- dense (tests)
    def to_dense(self) -> torch.Tensor:
        """Dense `(d, d)` matrix; for tests on small sides only.

        Returns
        -------
        torch.Tensor
            `(d, d)`.
        """
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        return (self.U * self.s) @ self.U.T + self.c * eye

    def full_eigenbasis(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Complete eigenbasis `(d, d)` and eigenvalues `(d,)`; tests only.

        Returns
        -------
        Q : torch.Tensor
            `(d, d)` orthonormal, `U` first.
        lam : torch.Tensor
            `(d,)`: ``s + c``, then `c` for the complement.
        """
        d, k = self.U.shape
        eye = torch.eye(d, dtype=self.dtype, device=self.device)
        Q, _ = torch.linalg.qr(torch.cat([self.U, eye], dim=1))
        Q = torch.cat([self.U, Q[:, k:d]], dim=1)
        lam = torch.cat([self.s + self.c, self.c.expand(d - k)])
        return Q, lam

    # ---------------------------------------------------------------- storage
    def to_state(self) -> dict[str, torch.Tensor | int | str]:
        """Plain dict of tensors and numbers (for `state_dict`).

        Returns
        -------
        dict[str, torch.Tensor or int or str]
            ``U``, ``s``, ``trace``, ``rank`` and ``residual``.
        """
        return {
            "U": self.U,
            "s": self.s,
            "trace": self.trace,
            "rank": self.rank,
            "residual": self.residual.value,
        }

    @classmethod
    def from_state(cls, state: dict) -> LowRankFactor:
        """Inverse of `to_state`.

        Returns
        -------
        LowRankFactor
        """
        return cls(
            state["U"], state["s"], state["trace"], state["rank"], state["residual"]
        )

    def __repr__(self) -> str:
        return (
            f"LowRankFactor(dim={self.dim}, k={self.s.numel()}/{self.rank}, "
            f"residual={self.residual.value})"
        )


def _truncated_eig_of_gram(M: torch.Tensor, rank: int):
    """Top-`rank` eigenpairs of ``M M^T`` for `M` `(d, n)`, via float64 SVD.

    Never forms a `d x d` matrix.

    Returns
    -------
    U : torch.Tensor
        `(d, k)` orthonormal, float64, with `k = min(rank, numerical rank)`.
    s : torch.Tensor
        `(k,)` squared singular values, float64, descending.
    """
    M64 = M.double()
    if M64.shape[1] == 0:
        return M64.new_zeros(M64.shape[0], 0), M64.new_zeros(0)
    U, sv, _ = torch.linalg.svd(M64, full_matrices=False)
    s = sv.square()
    tol = s.max() * max(M64.shape) * torch.finfo(torch.float64).eps
    k = min(rank, int((s > tol).sum()))
    return U[:, :k], s[:k]
