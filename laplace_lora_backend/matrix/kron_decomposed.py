r"""Eigen form of a `LoRAKron` with prior `deltas`: inverse, logdet, samples.

A block is ``F_out (x) F_in + delta I`` (weight vectorised row-major, `W` of
shape `(out, in)`). Dense factors are stored as eigenpairs `(Q, l)`. A wide
factor is a `LowRankFactor` :math:`U \operatorname{diag}(s) U^T + c I`; its
eigenbasis is ``[U, U_perp]`` with eigenvalues ``s + c`` and ``c``
(multiplicity `d - k`), and `U_perp` is never formed. With the small factor
``Q diag(l) Q^T`` (wide factor on the right, `W` `(n, d)`), the block's
eigenvalues are ``lam[i, j] = g(l_i, s_j + c)`` and ``mu[i] = g(l_i, c)``, with
``g(a, b) = a b + delta`` (or ``(a + sqrt(delta)) (b + sqrt(delta))`` with
damping), and for any exponent `e`

.. math::

    P^e W = Q \left[ (Q^T W U) \odot \lambda^e \, U^T
            + \operatorname{diag}(\mu^e) (Q^T W - Q^T W U U^T) \right]

    \log\det P = \sum_{ij} \log \lambda_{ij} + (d - k) \sum_i \log \mu_i

A wide factor on the left is the same computation on ``W^T``. Blocks with two
dense factors use laplace-torch's formulas, and so do the one-factor blocks of
biases (``F + delta I``, laplace-torch's layout for a bias vector).
"""

from __future__ import annotations

import numbers

import torch
from laplace.utils import KronDecomposed, block_diag, kron

from laplace_lora_backend.matrix.lowrank import LowRankFactor

__all__ = ["LoRAKronDecomposed"]


class LoRAKronDecomposed(KronDecomposed):
    """`KronDecomposed` whose blocks may hold one low-rank wide factor.

    Parameters
    ----------
    eigenvectors : list[list[torch.Tensor]]
        Per block, `Q` `(d, d)` for a dense factor or `U` `(d, k)` for a
        low-rank one.
    eigenvalues : list[list[torch.Tensor | LowRankFactor]]
        Per block, `l` `(d,)` for a dense factor or the `LowRankFactor`.
    deltas : torch.Tensor, optional
        Prior precision, scalar or one per block.
    damping : bool, default=False
    """

    def __init__(self, eigenvectors, eigenvalues, deltas=None, damping=False):
        for block in eigenvalues:
            if sum(isinstance(v, LowRankFactor) for v in block) > 1:
                raise ValueError("At most one low-rank factor per Kronecker block.")
        super().__init__(eigenvectors, eigenvalues, deltas, damping)

    # ------------------------------------------------------------ arithmetic
    def __add__(self, deltas: torch.Tensor) -> LoRAKronDecomposed:
        """Add a prior precision (scalar or one per block).

        Returns
        -------
        LoRAKronDecomposed
            A new object sharing the eigendecomposition.
        """
        self._check_deltas(deltas)
        return LoRAKronDecomposed(
            self.eigenvectors, self.eigenvalues, self.deltas + deltas, self.damping
        )

    def __mul__(self, scalar: float | torch.Tensor) -> LoRAKronDecomposed:
        """Multiply the curvature (not the prior) by a scalar.

        Returns
        -------
        LoRAKronDecomposed
            A new object with the same eigenvectors and prior.

        Raises
        ------
        ValueError
            If `scalar` is not a real number or a one-element tensor.
        """
        if not _is_scalar(scalar):
            raise ValueError("Invalid argument, can only multiply Kron with scalar.")
        eigenvalues = [
            [v * pow(scalar, 1 / len(block)) for v in block]
            for block in self.eigenvalues
        ]
        return LoRAKronDecomposed(
            self.eigenvectors, eigenvalues, self.deltas, self.damping
        )

    __radd__ = __add__
    __rmul__ = __mul__

    def detach(self) -> LoRAKronDecomposed:
        """Detach the prior `deltas` from the autograd graph.

        Returns
        -------
        LoRAKronDecomposed
            This object (changed in place).
        """
        self.deltas = self.deltas.detach()
        return self

    # -------------------------------------------------------------- helpers
    def _combine(self, a: torch.Tensor, b: torch.Tensor, delta: torch.Tensor):
        """Eigenvalue of the block with factor eigenvalues `a`, `b`.

        Returns
        -------
        torch.Tensor
            ``a b + delta``, or ``(a + sqrt(delta)) (b + sqrt(delta))`` with
            damping (broadcast shape of `a` and `b`).
        """
        if self.damping:
            sd = torch.sqrt(delta)
            return (a + sd) * (b + sd)
        return a * b + delta

    def _lowrank_parts(self, block_vecs, block_vals, delta):
        """For a block with a wide factor: `(Q, U, lam, mu, wide_left)`.

        `mu` is None when the low-rank factor kept its full rank (no
        complement): its eigenvalue can then be 0 (``c = 0``, no prior) and
        must not enter ``0 * log(0)`` or ``inf * 0``.

        Returns
        -------
        Q : torch.Tensor
            `(n, n)` eigenvectors of the small factor.
        U : torch.Tensor
            `(d, k)` kept eigenvectors of the wide factor.
        lam : torch.Tensor
            `(n, k)` block eigenvalues on ``Q (x) U``.
        mu : torch.Tensor or None
            `(n,)` block eigenvalues on the complement of `U`.
        wide_left : bool
            Whether the wide factor is the output (left) factor.
        """
        wide_left = isinstance(block_vals[0], LowRankFactor)
        lr = block_vals[0] if wide_left else block_vals[1]
        Q = block_vecs[1] if wide_left else block_vecs[0]
        l_small = block_vals[1] if wide_left else block_vals[0]
        c = lr.c
        lam = self._combine(l_small[:, None], (lr.s + c)[None, :], delta)
        mu = self._combine(l_small, c, delta)
        if lr.U.shape[1] == lr.dim:
            mu = None
        return Q, lr.U, lam, mu, wide_left

    @staticmethod
    def _is_lowrank(block_vals) -> bool:
        return any(isinstance(v, LowRankFactor) for v in block_vals)

    @staticmethod
    def _block_shape(block_vals) -> tuple[int, int]:
        """`(n_out, n_in)` of a block; a one-factor (bias) block is `(n, 1)`.

        Returns
        -------
        tuple[int, int]
        """
        return len(block_vals[0]), len(block_vals[1]) if len(block_vals) == 2 else 1

    def _dense_block(self, vecs, vals, delta):
        """Eigenvectors and eigenvalue grid of a block of dense factors.

        Returns
        -------
        Q1 : torch.Tensor
            `(n_out, n_out)`.
        Q2 : torch.Tensor
            `(n_in, n_in)`; `(1, 1)` ones for a one-factor (bias) block.
        eig : torch.Tensor
            `(n_out, n_in)` eigenvalues of the block on ``Q1 (x) Q2``: for a
            bias ``l + delta`` (laplace-torch: no damping on one factor).
        """
        if len(vals) == 1:
            return vecs[0], vecs[0].new_ones(1, 1), (vals[0] + delta)[:, None]
        (Q1, Q2), (l1, l2) = vecs, vals
        return Q1, Q2, self._combine(l1[:, None], l2[None, :], delta)

    # ---------------------------------------------------------------- logdet
    def logdet(self) -> torch.Tensor:
        """Log-determinant of the posterior precision (closed form).

        Returns
        -------
        torch.Tensor
            Scalar.
        """
        total = 0
        for vecs, vals, delta in zip(
            self.eigenvectors, self.eigenvalues, self.deltas, strict=True
        ):
            if not self._is_lowrank(vals):
                total = total + torch.log(self._dense_block(vecs, vals, delta)[2]).sum()
                continue
            _, U, lam, mu, _ = self._lowrank_parts(vecs, vals, delta)
            total = total + torch.log(lam).sum()
            if mu is not None:
                total = total + (U.shape[0] - U.shape[1]) * torch.log(mu).sum()
        return total

    # ------------------------------------------------------------------- bmm
    def _bmm(self, W: torch.Tensor, exponent: float = -1) -> torch.Tensor:
        """``P^exponent @ W`` for `W` `(batch, classes, params)`.

        Returns
        -------
        torch.Tensor
            `(batch, classes, params)`.
        """
        B, K, P = W.shape
        W = W.reshape(B * K, P)
        out, cur = [], 0
        for vecs, vals, delta in zip(
            self.eigenvectors, self.eigenvalues, self.deltas, strict=True
        ):
            n_out, n_in = self._block_shape(vals)
            Wp = W[:, cur : cur + n_out * n_in].reshape(B * K, n_out, n_in)
            cur += n_out * n_in
            if not self._is_lowrank(vals):
                Q1, Q2, eig = self._dense_block(vecs, vals, delta)
                M = _left_mm(Q1.T, _right_mm(Wp, Q2)) * eig.pow(exponent)
                res = _left_mm(Q1, _right_mm(M, Q2.T))
            else:
                Q, U, lam, mu, wide_left = self._lowrank_parts(vecs, vals, delta)
                Wr = Wp.transpose(1, 2) if wide_left else Wp  # (BK, n_small, d)
                W1 = _left_mm(Q.T, Wr)
                A = _right_mm(W1, U)
                R = _right_mm(A * lam.pow(exponent), U.T)
                if mu is not None:
                    R = R + mu.pow(exponent)[:, None] * (W1 - _right_mm(A, U.T))
                res = _left_mm(Q, R)
                if wide_left:
                    res = res.transpose(1, 2)
            out.append(res.reshape(B * K, n_out * n_in))
        return torch.cat(out, dim=1).reshape(B, K, P)

    def inv_square_form(self, W: torch.Tensor) -> torch.Tensor:
        """``W P^{-1} W^T`` per batch, `(batch, classes, classes)`.

        Computed in each block's eigenbasis, so `W` is rotated once and never
        rotated back (half the work of ``W @ bmm(W, -1).T``).

        Parameters
        ----------
        W : torch.Tensor
            `(batch, classes, params)`, e.g. Jacobians.

        Returns
        -------
        torch.Tensor
            `(batch, classes, classes)`.
        """
        B, K, P = W.shape
        out = W.new_zeros(B, K, K)
        cur = 0
        for vecs, vals, delta in zip(
            self.eigenvectors, self.eigenvalues, self.deltas, strict=True
        ):
            n_out, n_in = self._block_shape(vals)
            Wp = W[:, :, cur : cur + n_out * n_in].reshape(B, K, n_out, n_in)
            cur += n_out * n_in
            if not self._is_lowrank(vals):
                Q1, Q2, eig = self._dense_block(vecs, vals, delta)
                M = _left_mm(Q1.T, _right_mm(Wp, Q2))
                out = out + torch.einsum("bkij,blij->bkl", M * eig.reciprocal(), M)
                continue
            Q, U, lam, mu, wide_left = self._lowrank_parts(vecs, vals, delta)
            Wr = Wp.transpose(2, 3) if wide_left else Wp  # (B, K, n_small, d)
            W1 = _left_mm(Q.T, Wr)
            A = _right_mm(W1, U)
            out = out + torch.einsum("bkij,blij->bkl", A * lam.reciprocal(), A)
            if mu is not None:
                inv_mu = mu.reciprocal()[:, None]
                out = (
                    out
                    + torch.einsum("bkid,blid->bkl", W1 * inv_mu, W1)
                    - torch.einsum("bkij,blij->bkl", A * inv_mu, A)
                )
        return out

    # ------------------------------------------------------------------ diag
    def diag(self, exponent: float = 1) -> torch.Tensor:
        """Diagonal of ``P^exponent``, `(params,)`.

        Returns
        -------
        torch.Tensor
            `(params,)`.
        """
        out = []
        for vecs, vals, delta in zip(
            self.eigenvectors, self.eigenvalues, self.deltas, strict=True
        ):
            if not self._is_lowrank(vals):
                Q1, Q2, eig = self._dense_block(vecs, vals, delta)
                out.append((Q1.square() @ eig.pow(exponent) @ Q2.square().T).flatten())
                continue
            Q, U, lam, mu, wide_left = self._lowrank_parts(vecs, vals, delta)
            Q2, U2 = Q.square(), U.square()
            D = (Q2 @ lam.pow(exponent)) @ U2.T
            if mu is not None:
                D = D + (Q2 @ mu.pow(exponent))[:, None] * (1 - U2.sum(1))[None, :]
            out.append((D.T if wide_left else D).flatten())
        return torch.cat(out)

    # -------------------------------------------------------- dense (tests)
    def to_matrix(self, exponent: float = 1) -> torch.Tensor:
        """Dense ``P^exponent``; tests only (forms the full eigenbasis).

        Returns
        -------
        torch.Tensor
            `(params, params)`, block-diagonal.
        """
        blocks = []
        for vecs, vals, delta in zip(
            self.eigenvectors, self.eigenvalues, self.deltas, strict=True
        ):
            Qs, ls = [], []
            for Q, v in zip(vecs, vals, strict=True):
                if isinstance(v, LowRankFactor):
                    Q, v = v.full_eigenbasis()
                Qs.append(Q)
                ls.append(v)
            Q1, Q2, eig = self._dense_block(Qs, ls, delta)
            Qk = kron(Q1, Q2)
            blocks.append(Qk @ torch.diag(eig.pow(exponent).flatten()) @ Qk.T)
        return block_diag(blocks)


def _right_mm(X: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """``X @ M`` for a batch `X` `(..., m, n)` and a matrix `M` `(n, c)`.

    One product ``(... * m, n) @ (n, c)``. `torch.matmul` folds the batch
    only when `X`'s batch dimensions are contiguous with its rows; a slice of
    the parameter vector or a transposed view is not, and it then runs a
    batch of `(m, n) @ (n, c)` products, 1.4-1.7 times slower for a narrow
    `m` (a LoRA rank) and a wide `n`. The copy `reshape` then makes costs
    one pass over `X`.

    Returns
    -------
    torch.Tensor
        `(..., m, c)`.
    """
    rows = X.shape[:-1].numel()  # explicit: `-1` is ambiguous for an empty `X`
    return (X.reshape(rows, X.shape[-1]) @ M).view(*X.shape[:-1], M.shape[-1])


def _left_mm(Q: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``Q @ X`` for a square `Q` `(n, n)` and a batch `X` `(..., n, m)`.

    A wide `Q` times a narrow `X` is one folded product ``X^T Q^T``
    (`(... * m, n) @ (n, n)`, `_right_mm`) instead of a batch of
    `(n, n) @ (n, m)` products, which BLAS runs several times slower for
    small `m` (a LoRA `B` block: `n` the layer's width, `m` the rank).

    Returns
    -------
    torch.Tensor
        `(..., n, m)`.
    """
    if Q.shape[-1] <= X.shape[-1]:
        return Q @ X
    return _right_mm(X.mT, Q.mT).mT


def _is_scalar(value: float | int | torch.Tensor) -> bool:
    """A real number, or a tensor with one element and at most one dimension.

    Returns
    -------
    bool
        False for `bool` values.
    """
    if isinstance(value, bool):
        return False
    if isinstance(value, numbers.Real):  # also numpy scalars
        return True
    return torch.is_tensor(value) and value.ndim <= 1 and value.numel() == 1
