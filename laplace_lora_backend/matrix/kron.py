"""Accumulating Kronecker container whose wide factors may be low-rank.

`LoRAKron` is laplace-torch's `Kron` (one block ``[F_out, F_in]`` per LoRA
weight, summed over batches while fitting) where a factor is either a dense
`(d, d)` tensor or a `LowRankFactor`. Sums merge low-rank factors by a float64
SVD; `decompose` eigendecomposes only the dense factors (a low-rank factor is
already in eigen form) and returns a `LoRAKronDecomposed`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from laplace.utils import Kron, symeig

from laplace_lora_backend.matrix.kron_decomposed import LoRAKronDecomposed
from laplace_lora_backend.matrix.lowrank import LowRankFactor
from laplace_lora_backend.matrix.lowrank_options import LowRankOptions

__all__ = ["LoRAKron", "Factor"]

Factor = torch.Tensor | LowRankFactor


def _dense(F: Factor) -> torch.Tensor:
    return F.to_dense() if isinstance(F, LowRankFactor) else F


class LoRAKron(Kron):
    """Kronecker blocks ``[F_out, F_in]`` with dense or low-rank factors.

    Parameters
    ----------
    kfacs : list[list[torch.Tensor | LowRankFactor]]
        One block per weight, in parameter order: ``[F_out, F_in]`` for a
        matrix, ``[F]`` (dense) for a bias vector (laplace-torch's layout).

    Raises
    ------
    ValueError
        If a dense factor is not a square matrix (e.g. a 1-D diagonal).
    """

    def __init__(self, kfacs: list[list[Factor]]) -> None:
        for i, block in enumerate(kfacs):
            for F in block:
                if isinstance(F, torch.Tensor) and (
                    F.ndim != 2 or F.shape[0] != F.shape[1]
                ):
                    raise ValueError(
                        f"Block {i}: a dense Kronecker factor must be a square "
                        f"(d, d) matrix, got shape {tuple(F.shape)}. Pass a "
                        "diagonal factor as torch.diag(v)."
                    )
        super().__init__(kfacs)

    @classmethod
    def init_from_shapes(
        cls,
        shapes: Iterable[tuple[int, ...]],
        dtype: torch.dtype,
        device: torch.device,
        lowrank: LowRankOptions | None = None,
    ) -> LoRAKron:
        """Zero factors for weights of the given `(out, in)` or `(out,)` shapes.

        Sides that `lowrank` compresses get a rank-0 `LowRankFactor`, others a
        dense zero matrix (`LowRankOptions.lowrank_sides`); `lowrank=None`
        keeps everything dense. A bias `(out,)` gets one dense factor.

        Returns
        -------
        LoRAKron
            One block ``[F_out, F_in]`` (or ``[F]``) per shape.
        """
        lowrank = lowrank or LowRankOptions()

        def zero(d: int, low: bool) -> Factor:
            if low:
                return LowRankFactor.zeros(
                    d, lowrank.rank, lowrank.residual, dtype, device
                )
            return torch.zeros(d, d, dtype=dtype, device=device)

        return cls(
            [
                [
                    zero(d, low)
                    for d, low in zip(s, lowrank.lowrank_sides(s), strict=True)
                ]
                for s in map(tuple, shapes)
            ]
        )

    def __add__(self, other: Kron) -> LoRAKron:
        """Add factor by factor (low-rank factors are merged and re-truncated).

        Returns
        -------
        LoRAKron
            A new object; neither operand is changed.

        Raises
        ------
        ValueError
            If `other` is not a `Kron` with the same blocks, or a factor's
            shape or storage (dense vs low-rank) differs.
        """
        if not isinstance(other, Kron) or len(other.kfacs) != len(self.kfacs):
            raise ValueError(
                "Can only add Kron objects with the same blocks (same LoRA weights)."
            )
        kfacs = []
        for Fi, Fj in zip(self.kfacs, other.kfacs, strict=True):
            if len(Fi) != len(Fj) or any(
                type(a) is not type(b) or len(a) != len(b)
                for a, b in zip(Fi, Fj, strict=True)
            ):
                raise ValueError(
                    "Kron blocks differ in shape or storage (dense vs low-rank): the "
                    "backend and the Laplace object must use the same lowrank_* "
                    "settings."
                )
            kfacs.append([a.add(b) for a, b in zip(Fi, Fj, strict=True)])
        return LoRAKron(kfacs)

    __radd__ = __add__

    def __mul__(self, scalar: float | torch.Tensor) -> LoRAKron:
        """Multiply by a scalar, spread evenly over the factors of a block.

        Returns
        -------
        LoRAKron
            A new object.
        """
        return LoRAKron([[F * pow(scalar, 1 / len(b)) for F in b] for b in self.kfacs])

    __rmul__ = __mul__

    def decompose(self, damping: bool = False) -> LoRAKronDecomposed:
        """Eigendecompose the dense factors; low-rank ones are already eigen.

        Parameters
        ----------
        damping : bool, default=False
            laplace-torch's damping (prior mixed into both factors).

        Returns
        -------
        LoRAKronDecomposed
        """
        eigvecs, eigvals = [], []
        eigh = _SharedEigh()
        for block in self.kfacs:
            vecs, vals = [], []
            for F in block:
                if isinstance(F, LowRankFactor):
                    vecs.append(F.U)
                    vals.append(F)
                else:
                    lam, Q = eigh(F)
                    vecs.append(Q)
                    vals.append(lam)
            eigvecs.append(vecs)
            eigvals.append(vals)
        return LoRAKronDecomposed(eigvecs, eigvals, damping=damping)

    # dense references and upstream helpers (tests, small models)
    def to_matrix(self) -> torch.Tensor:
        """Dense block-diagonal matrix; tests only.

        Returns
        -------
        torch.Tensor
            `(P, P)`.
        """
        return Kron([[_dense(F) for F in b] for b in self.kfacs]).to_matrix()

    def diag(self) -> torch.Tensor:
        """Diagonal of the whole Kronecker factorisation.

        Returns
        -------
        torch.Tensor
            `(P,)`.
        """
        out = []
        for block in self.kfacs:
            d = _factor_diag(block[0])
            for F in block[1:]:
                d = torch.outer(d, _factor_diag(F)).flatten()
            out.append(d)
        return torch.cat(out)

    def logdet(self) -> torch.Tensor:
        """Log-determinant (without prior); uses `decompose`.

        Returns
        -------
        torch.Tensor
            Scalar.
        """
        return self.decompose().logdet()

    def bmm(self, W: torch.Tensor, exponent: float = 1) -> torch.Tensor:
        """``self @ W`` (exponent 1 only, as upstream `Kron.bmm`).

        Returns
        -------
        torch.Tensor
            Shaped like `W` (see `LoRAKronDecomposed.bmm`).

        Raises
        ------
        ValueError
            If `exponent` is not 1.
        """
        if exponent != 1:
            raise ValueError("Only exponent 1 before decomposition; decompose first.")
        return self.decompose().bmm(W, exponent=1)

    def factor_bytes(self) -> int:
        """Bytes held by all factors (what fitting keeps in memory).

        Returns
        -------
        int
        """
        total = 0
        for block in self.kfacs:
            for F in block:
                if isinstance(F, LowRankFactor):
                    total += F.numel_stored() * F.U.element_size()
                else:
                    total += F.numel() * F.element_size()
        return total

    # ---------------------------------------------------------------- storage
    def to_state(self) -> list[list[Any]]:
        """Factors as tensors and plain dicts (torch.save/load friendly).

        Returns
        -------
        list[list[Any]]
            Per block, dense factors as tensors and low-rank ones as their
            `LowRankFactor.to_state` dicts.
        """
        return [
            [F.to_state() if isinstance(F, LowRankFactor) else F for F in b]
            for b in self.kfacs
        ]

    @classmethod
    def from_state(cls, state: list[list[Any]]) -> LoRAKron:
        """Inverse of `to_state`.

        Returns
        -------
        LoRAKron
        """
        return cls(
            [
                [LowRankFactor.from_state(F) if isinstance(F, dict) else F for F in b]
                for b in state
            ]
        )


class _SharedEigh:
    """`symeig` that decomposes equal factors once.

    LoRA weights that read the same input (q, k and v of a layer) have equal
    input factors (`LoRAKFAC` accumulates one per distinct input); their
    eigendecomposition, the cubic part of a fit, is computed once and shared.
    Factors are matched exactly (`torch.equal`), so the result is the one
    each factor's own `symeig` gives.
    """

    def __init__(self) -> None:
        self._seen: dict[tuple, list[tuple[torch.Tensor, tuple]]] = {}

    def __call__(self, F: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (tuple(F.shape), F.dtype, F.device, float(F.diagonal().sum()))
        candidates = self._seen.setdefault(key, [])
        for G, result in candidates:
            if G is F or torch.equal(G, F):
                return result
        result = symeig(F)
        candidates.append((F, result))
        return result


def _factor_diag(F: Factor) -> torch.Tensor:
    if isinstance(F, LowRankFactor):
        return (F.U.square() * F.s).sum(1) + F.c
    return F.diagonal()
