"""Property-based tests (hypothesis) of the matrix identities in
`laplace_lora_backend.matrix`, float64, against dense references built
independently with `torch.kron` / `torch.block_diag` / `torch.linalg`.

Data are drawn from a hypothesis-chosen seed; shapes (factor sides 1..12),
which factor of a block is low-rank, ranks, residual modes, number of blocks
(1..3), damping, curvature scale and prior precisions (1e-3..1e3, scalar,
length-1 or one per block) are drawn by hypothesis.

Tolerances are first-order perturbation bounds, not fudge factors. Every
computation here (ours and the dense oracle) is a backward-stable
eigendecomposition / product, i.e. exact for some ``P + dP`` with
``||dP||_2 <= c eps ||P||_2``. For ``f(x) = x^e`` on the spectrum
``[lo, hi]`` of the (symmetric positive definite) posterior precision `P`,
``||f(P + dP) - f(P)||_2 <= max|f'| ||dP||_2`` (mean value theorem on the
divided differences), plus rounding of the result itself; for the
log-determinant ``|d logdet| <= ||dP||_2 tr(P^{-1})``. `SLACK` plays the role
of `c`, which grows with the dimension (here at most 3 * 12 * 12 = 432).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from laplace.utils import KronDecomposed

from laplace_lora_backend.matrix import LoRAKron, LoRAKronDecomposed, LowRankFactor

DTYPE = torch.float64
EPS = torch.finfo(DTYPE).eps
# Constant `c` of the backward-error bounds above (dimension-dependent
# constants of eigh / matmul chains for sides <= 12, up to 432 parameters).
# Over 300 drawn posteriors the largest c actually needed was ~30.
SLACK = 1e3
MAX_SIDE = 12
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None)


# ---------------------------------------------------------------- strategies
@dataclass(frozen=True)
class FactorSpec:
    """One Kronecker factor: `n_rows` Gaussian rows of width `side`; dense
    ``rows.T @ rows`` when `rank` is None, else ``LowRankFactor.from_rows``."""

    side: int
    n_rows: int
    rank: int | None = None
    residual: str = "trace"


@dataclass(frozen=True)
class Case:
    """A `LoRAKron` (blocks ``[F_out, F_in]``) plus what turns it into a
    posterior precision ``H.decompose(damping) * scale + deltas``."""

    blocks: tuple[tuple[FactorSpec, ...], ...]  # [F_out, F_in] or [F] (a bias)
    seed: int
    deltas: tuple[float, ...]  # one per block (equal ones if `delta_mode` != block)
    delta_mode: str  # "scalar" | "length1" | "per_block"
    damping: bool
    scale: float


ROWS = {  # number of rows of a factor of side d
    "any": lambda d: (0, d + 2),
    "deficient": lambda d: (0, d - 1),  # rank-deficient (maybe zero)
    "full": lambda d: (d, d + 2),  # full rank (dense; truncated "trace")
}


@st.composite
def factor_specs(draw, side: int, lowrank: bool, rows: str):
    """A factor with `rows` (see `ROWS`) Gaussian rows."""
    n_rows = draw(st.integers(*ROWS[rows](side)))
    if rows == "full":  # nonsingular: truncated with c > 0, or untruncated
        if not lowrank:
            return FactorSpec(side, n_rows)
        if side > 1 and draw(st.booleans()):
            return FactorSpec(side, n_rows, draw(st.integers(1, side - 1)), "trace")
        rank = draw(st.integers(side, side + 2))
        return FactorSpec(side, n_rows, rank, draw(st.sampled_from(["trace", "none"])))
    if not lowrank:
        return FactorSpec(side, n_rows)
    rank = draw(st.integers(1, side + 2))
    residual = draw(st.sampled_from(["trace", "none"]))
    return FactorSpec(side, n_rows, rank, residual)


@st.composite
def block_specs(draw, rows: str = "any", allow_lowrank: bool = True):
    """``[F_out, F_in]``: both dense, or one of them low-rank; or ``[F]``
    (dense, a bias: laplace-torch's one-factor layout)."""
    if draw(st.integers(0, 4)) == 0:
        return (draw(factor_specs(draw(st.integers(1, MAX_SIDE)), False, rows)),)
    sides = draw(st.tuples(*[st.integers(1, MAX_SIDE)] * 2))
    wide = draw(st.sampled_from([None, 0, 1] if allow_lowrank else [None]))
    return tuple(draw(factor_specs(d, i == wide, rows)) for i, d in enumerate(sides))


log_deltas = st.floats(-3.0, 3.0)


@st.composite
def cases(draw, rows="any", allow_lowrank=True, log_delta=log_deltas):
    """A full posterior-precision case (see `Case`)."""
    n_blocks = draw(st.integers(1, 3))
    blocks = tuple(draw(block_specs(rows, allow_lowrank)) for _ in range(n_blocks))
    mode = draw(st.sampled_from(["scalar", "length1", "per_block"]))
    if mode == "per_block":
        deltas = tuple(10 ** draw(log_delta) for _ in range(n_blocks))
    else:
        deltas = (10 ** draw(log_delta),) * n_blocks
    return Case(
        blocks=blocks,
        seed=draw(st.integers(0, 2**31 - 1)),
        deltas=deltas,
        delta_mode=mode,
        damping=draw(st.booleans()),
        scale=draw(st.sampled_from([1.0, 0.3, 2.5])),
    )


# ------------------------------------------------------------------ builders
def lowrank_dense(F: LowRankFactor, rows: torch.Tensor) -> torch.Tensor:
    """``U diag(s) U^T + c I`` with `c` recomputed from the definition
    (exact trace of `rows` for "trace", 0 for "none")."""
    d = F.dim
    c = 0.0
    if F.residual.value == "trace":
        c = max(rows.square().sum().item() - F.s.sum().item(), 0.0) / d
    return (F.U * F.s) @ F.U.T + c * torch.eye(d, dtype=DTYPE)


def build_kron(case: Case) -> tuple[LoRAKron, list[list[torch.Tensor]]]:
    """`LoRAKron` and its dense factors (the oracle's input)."""
    g = torch.Generator().manual_seed(case.seed)
    kfacs, dense = [], []
    for block in case.blocks:
        fs, ds = [], []
        for spec in block:
            rows = torch.randn(spec.n_rows, spec.side, generator=g, dtype=DTYPE)
            if spec.rank is None:
                F = rows.T @ rows
                ds.append(F.clone())
            else:
                F = LowRankFactor.from_rows(rows, spec.rank, spec.residual, DTYPE)
                ds.append(lowrank_dense(F, rows))
            fs.append(F)
        kfacs.append(fs)
        dense.append(ds)
    return LoRAKron(kfacs), dense


def kron_block(factors: list[torch.Tensor]) -> torch.Tensor:
    """``A (x) B`` of a two-factor block; ``F`` of a bias block."""
    return factors[0] if len(factors) == 1 else torch.kron(*factors)


def delta_tensor(case: Case) -> torch.Tensor:
    if case.delta_mode == "scalar":
        return torch.tensor(case.deltas[0], dtype=DTYPE)
    if case.delta_mode == "length1":
        return torch.tensor(case.deltas[:1], dtype=DTYPE)
    return torch.tensor(case.deltas, dtype=DTYPE)


def dense_posterior(case: Case, dense: list[list[torch.Tensor]]) -> torch.Tensor:
    """Block-diagonal ``scale A (x) B + delta I`` (or, with damping,
    ``(sqrt(scale) A + sqrt(delta) I) (x) (sqrt(scale) B + sqrt(delta) I)``)."""
    blocks = []
    for factors, delta in zip(dense, case.deltas, strict=True):
        if len(factors) == 1:  # a bias: F + delta I (no damping on one factor)
            F = factors[0]
            blocks.append(case.scale * F + delta * torch.eye(len(F), dtype=DTYPE))
            continue
        A, B = factors
        Ia, Ib = (torch.eye(len(F), dtype=DTYPE) for F in (A, B))
        if case.damping:
            r, sd = math.sqrt(case.scale), math.sqrt(delta)
            blocks.append(torch.kron(r * A + sd * Ia, r * B + sd * Ib))
        else:
            P = len(A) * len(B)
            blocks.append(
                case.scale * torch.kron(A, B) + delta * torch.eye(P, dtype=DTYPE)
            )
    return torch.block_diag(*blocks)


@dataclass
class Posterior:
    """Our structured posterior and its dense oracle with its spectrum."""

    post: LoRAKronDecomposed
    P: torch.Tensor
    evals: torch.Tensor
    evecs: torch.Tensor

    @property
    def n(self) -> int:
        return self.P.shape[0]

    def power(self, e: float) -> torch.Tensor:
        """Dense ``P^e`` from the oracle's eigendecomposition."""
        return (self.evecs * self.evals.pow(e)) @ self.evecs.T

    def bound(self, e: float) -> float:
        """Bound on ``||computed P^e - exact P^e||_2`` (see module doc)."""
        lo, hi = self.evals.min().item(), self.evals.max().item()
        assert lo > 0, "dense oracle is not positive definite"
        lipschitz = abs(e) * max(lo ** (e - 1), hi ** (e - 1))
        return SLACK * EPS * (hi * lipschitz + max(lo**e, hi**e))


def posterior(case: Case) -> Posterior:
    H, dense = build_kron(case)
    post = H.decompose(damping=case.damping) * case.scale + delta_tensor(case)
    assert isinstance(post, LoRAKronDecomposed)
    P = dense_posterior(case, dense)
    evals, evecs = torch.linalg.eigh(P)
    return Posterior(post, P, evals, evecs)


def random_w(n: int, seed: int, batch: int = 3, classes: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(batch, classes, n, generator=g, dtype=DTYPE)


def fro(x: torch.Tensor) -> float:
    return torch.linalg.vector_norm(x).item()


def maxabs(x: torch.Tensor) -> float:
    return x.abs().max().item() if x.numel() else 0.0


# ------------------------------------------------------------ LowRankFactor
@SETTINGS
@given(
    side=st.integers(1, MAX_SIDE),
    n_rows=st.integers(1, MAX_SIDE + 3),
    rank=st.integers(1, MAX_SIDE + 2),
    residual=st.sampled_from(["trace", "none"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_lowrank_from_rows_is_truncated_eigendecomposition(
    side, n_rows, rank, residual, seed
):
    """``from_rows`` keeps the top ``min(rank, n, d)`` eigenpairs of
    ``G = rows^T rows`` (U orthonormal, s descending, ``G U = U diag(s)``),
    tracks ``trace = tr G``, is exact when ``rank >= rank(G)``, and its dense
    form is ``U diag(s) U^T + c I`` with ``c = (tr G - sum s) / d`` ("trace",
    so the trace is preserved) or ``c = 0`` ("none")."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(n_rows, side, generator=g, dtype=DTYPE)
    G = rows.T @ rows
    F = LowRankFactor.from_rows(rows, rank, residual, DTYPE)
    k = F.s.numel()
    tol = SLACK * EPS * torch.linalg.matrix_norm(G, 2).item()

    assert k == min(rank, n_rows, side)  # Gaussian rows have full rank a.s.
    assert F.U.shape == (side, k) and F.dim == side and F.rank == rank
    assert torch.allclose(
        F.U.T @ F.U, torch.eye(k, dtype=DTYPE), rtol=0, atol=SLACK * EPS
    )
    assert (F.s[:-1] >= F.s[1:]).all() and (F.s >= 0).all()
    assert abs(F.trace.item() - torch.trace(G).item()) <= tol
    assert fro(G @ F.U - F.U * F.s) <= tol
    top = torch.linalg.eigvalsh(G).flip(0)[:k]
    assert (F.s - top).abs().max().item() <= tol
    if k == min(n_rows, side):  # nothing truncated: exact
        assert fro(F.to_dense() - G) <= tol
    assert fro(F.to_dense() - lowrank_dense(F, rows)) <= tol
    expected_trace = torch.trace(G) if residual == "trace" else F.s.sum()
    assert abs(torch.trace(F.to_dense()) - expected_trace).item() <= tol
    assert F.c.item() >= 0 and (residual == "trace" or F.c.item() == 0)


@SETTINGS
@given(
    side=st.integers(1, MAX_SIDE),
    n_rows=st.tuples(st.integers(0, MAX_SIDE + 2), st.integers(0, MAX_SIDE + 2)),
    rank=st.integers(1, MAX_SIDE + 2),
    residual=st.sampled_from(["trace", "none"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_lowrank_merge_is_truncation_of_the_sum(side, n_rows, rank, residual, seed):
    """``a + b`` adds the tracked traces and keeps the top-`rank` eigenpairs
    of the sum of the two low-rank parts ``Ua sa Ua^T + Ub sb Ub^T``; it
    equals the dense sum when nothing is truncated."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randn(n, side, generator=g, dtype=DTYPE) for n in n_rows]
    a, b = (LowRankFactor.from_rows(r, rank, residual, DTYPE) for r in rows)
    m = a + b
    L = (a.U * a.s) @ a.U.T + (b.U * b.s) @ b.U.T
    tol = SLACK * EPS * max(torch.linalg.matrix_norm(L, 2).item(), 1e-300)
    k = m.s.numel()

    assert torch.allclose(m.trace, a.trace + b.trace, rtol=1e-14, atol=0)
    assert k <= rank and m.rank == rank and m.residual == a.residual
    assert torch.allclose(
        m.U.T @ m.U, torch.eye(k, dtype=DTYPE), rtol=0, atol=SLACK * EPS
    )
    assert fro(L @ m.U - m.U * m.s) <= tol
    top = torch.linalg.eigvalsh(L).flip(0)
    assert maxabs(m.s - top[:k]) <= tol
    if k < rank:  # below the rank cap only (numerically) zero modes are cut
        assert maxabs(top[k:]) <= tol
    if residual == "trace":
        assert abs(torch.trace(m.to_dense()) - m.trace).item() <= tol * side
    if k == min(a.s.numel() + b.s.numel(), side):  # nothing truncated: exact
        exact = a.to_dense() + b.to_dense()
        assert fro(m.to_dense() - exact) <= tol * side


@SETTINGS
@given(
    side=st.integers(1, MAX_SIDE),
    n_rows=st.integers(0, MAX_SIDE + 2),
    rank=st.integers(1, MAX_SIDE + 2),
    residual=st.sampled_from(["trace", "none"]),
    factor=st.floats(1e-2, 1e2),
    seed=st.integers(0, 2**31 - 1),
)
def test_lowrank_full_eigenbasis_and_scaling(
    side, n_rows, rank, residual, factor, seed
):
    """``full_eigenbasis`` is orthogonal and reproduces the dense factor
    (eigenvalues ``s + c`` on `U`, `c` on its complement), and
    ``(a F).to_dense() = a F.to_dense()`` for ``a > 0``."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(n_rows, side, generator=g, dtype=DTYPE)
    F = LowRankFactor.from_rows(rows, rank, residual, DTYPE)
    D = F.to_dense()
    tol = SLACK * EPS * max(torch.linalg.matrix_norm(D, 2).item(), 1e-300)
    Q, lam = F.full_eigenbasis()
    assert Q.shape == (side, side) and lam.shape == (side,)
    assert torch.allclose(
        Q.T @ Q, torch.eye(side, dtype=DTYPE), rtol=0, atol=SLACK * EPS
    )
    assert fro((Q * lam) @ Q.T - D) <= tol
    assert fro((factor * F).to_dense() - factor * D) <= factor * tol
    assert fro((F * factor).to_dense() - factor * D) <= factor * tol


# ------------------------------------------------------------------ LoRAKron
@SETTINGS
@given(case=cases())
def test_kron_dense_forms_match_dense_kronecker(case):
    """``LoRAKron.to_matrix`` is ``block_diag(A_b (x) B_b)``; ``diag`` is its
    diagonal; ``bmm(W)`` (exponent 1) is the dense product; ``H * a`` is
    ``a H``; ``H + H`` (low-rank factors merged) adds factor by factor;
    ``decompose().to_matrix()`` reproduces ``H``."""
    H, dense = build_kron(case)
    M = torch.block_diag(*[kron_block(factors) for factors in dense])
    norm = max(torch.linalg.matrix_norm(M, 2).item(), 1e-300)
    tol = SLACK * EPS * norm
    assert fro(H.to_matrix() - M) <= tol
    assert (H.diag() - M.diagonal()).abs().max().item() <= tol
    W = random_w(M.shape[0], case.seed)
    assert fro(H.bmm(W) - W @ M) <= tol * fro(W)
    assert fro((H * case.scale).to_matrix() - case.scale * M) <= case.scale * tol
    assert fro(H.decompose().to_matrix() - M) <= tol
    # factor-wise sums: 4 A (x) B for a pair, 2 F for a bias
    M2 = torch.block_diag(*[kron_block([2 * F for F in fs]) for fs in dense])
    assert fro((H + H).to_matrix() - M2) <= 4 * tol


@SETTINGS
@given(case=cases(rows="full"))
def test_kron_logdet_of_nonsingular_curvature(case):
    """For full-rank factors (no prior) ``LoRAKron.logdet`` equals slogdet of
    ``block_diag(A_b (x) B_b)``. Low-rank factors here are truncated
    (``c > 0``) or keep their full rank (``c`` may be 0)."""
    H, dense = build_kron(case)
    M = torch.block_diag(*[kron_block(factors) for factors in dense])
    ev = torch.linalg.eigvalsh(M)
    sign, ref = torch.linalg.slogdet(M)
    assert sign.item() == 1.0 and ev.min().item() > 0
    tol = SLACK * EPS * ev.max().item() * ev.reciprocal().sum().item()
    assert abs(H.logdet().item() - ref.item()) <= tol


@pytest.mark.parametrize("residual", ["trace", "none"])
def test_zero_prior_untruncated_lowrank_factor(residual):
    """Regression (found by the property tests): ``LoRAKron([[S, F]])`` with
    ``F = from_rows(rows (6, 4), rank=4)`` keeps its full rank and ``c = 0``;
    it is nonsingular, so without a prior (``deltas = 0``) ``logdet`` must
    equal slogdet and ``bmm(W, -1)``, ``inv_square_form`` and ``diag(-1)``
    must be finite and match the dense inverse."""
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(6, 4, generator=g, dtype=DTYPE)
    S = torch.randn(3, 2, generator=g, dtype=DTYPE)
    H = LoRAKron([[S.T @ S, LowRankFactor.from_rows(rows, 4, residual, DTYPE)]])
    M = H.to_matrix()
    W = torch.randn(2, 1, M.shape[0], generator=g, dtype=DTYPE)
    post = H.decompose()
    Minv = torch.linalg.inv(M)
    assert torch.allclose(H.logdet(), torch.linalg.slogdet(M)[1], rtol=1e-10)
    assert torch.allclose(post.bmm(W, -1), W @ Minv, rtol=1e-8, atol=1e-10)
    assert torch.allclose(post.diag(-1), Minv.diagonal(), rtol=1e-8, atol=1e-10)
    isf = post.inv_square_form(W)
    assert torch.allclose(isf, W @ Minv @ W.transpose(1, 2), rtol=1e-8)


# ------------------------------------------------------- LoRAKronDecomposed
@SETTINGS
@given(case=cases())
def test_decomposed_to_matrix_matches_dense_posterior(case):
    """``(H.decompose(damping) * scale + deltas).to_matrix()`` equals the
    dense ``scale A (x) B + delta I`` per block (damped:
    ``(sqrt(scale) A + sqrt(delta) I) (x) (sqrt(scale) B + sqrt(delta) I)``)."""
    p = posterior(case)
    assert fro(p.post.to_matrix() - p.P) <= p.bound(1)


@SETTINGS
@given(case=cases())
def test_logdet_matches_slogdet(case):
    """``logdet()`` (closed form, incl. ``(d - k) log mu`` for the discarded
    directions) equals ``slogdet`` of the dense posterior, sign +1."""
    p = posterior(case)
    sign, ref = torch.linalg.slogdet(p.P)
    assert sign.item() == 1.0
    ours = p.post.logdet()
    tol = SLACK * EPS * p.evals.max().item() * p.evals.reciprocal().sum().item()
    assert torch.isfinite(ours)
    assert abs(ours.item() - ref.item()) <= tol


@SETTINGS
@given(case=cases(), e=st.floats(-2.0, 2.0))
def test_bmm_matches_dense_matrix_power(case, e):
    """``bmm(W, e)`` equals ``W (P^e)`` row-wise for e = 1, -1, -1/2 and a
    drawn e in [-2, 2]; for e = -1 also ``solve(P, w)``; for e = 1 the plain
    dense product. 1-D and 2-D `W` follow laplace-torch's convention."""
    p = posterior(case)
    W = random_w(p.n, case.seed)
    for exponent in (1, -1, -0.5, e):
        ours = p.post.bmm(W, exponent=exponent)
        assert ours.shape == W.shape
        ref = W @ p.power(exponent)
        assert fro(ours - ref) <= p.bound(exponent) * fro(W), exponent
    assert fro(p.post.bmm(W, 1) - W @ p.P) <= p.bound(1) * fro(W)
    ref = torch.linalg.solve(p.P, W.reshape(-1, p.n).T).T.reshape(W.shape)
    assert fro(p.post.bmm(W, -1) - ref) <= p.bound(-1) * fro(W)
    # upstream `bmm` also takes (params,) and (batch, params), then squeezes
    b = p.bound(-1)
    for w, r in ((W[0, 0], ref[0, 0]), (W[:, 0], ref[:, 0])):
        assert fro(p.post.bmm(w, -1).reshape(-1) - r.reshape(-1)) <= b * fro(w)


@SETTINGS
@given(case=cases())
def test_inverse_sqrt_squares_to_inverse(case):
    """``S = P^{-1/2}`` (``bmm`` with exponent -1/2 on the identity) is
    symmetric and ``S S = P^{-1}`` (dense ``inv``); this is what sampling
    relies on."""
    p = posterior(case)
    eye = torch.eye(p.n, dtype=DTYPE)
    S = p.post.bmm(eye[None], exponent=-0.5)[0]  # rows: (P^{-1/2} e_i)^T
    b = p.bound(-0.5)
    assert fro(S - S.T) <= 2 * b * math.sqrt(p.n)
    # ||S S - P^{-1}|| <= 2 ||P^{-1/2}|| ||dS|| + ||dS||^2, plus inv's own error
    s_norm = p.evals.min().item() ** -0.5
    tol = (2 * s_norm * b + b * b) * math.sqrt(p.n) + p.bound(-1)
    assert fro(S @ S - torch.linalg.inv(p.P)) <= tol


@SETTINGS
@given(case=cases())
def test_inv_square_form_matches_dense(case):
    """``inv_square_form(W)`` is ``W P^{-1} W^T`` per batch element, shape
    `(batch, classes, classes)`, and equals ``W @ bmm(W, -1)^T``
    (laplace-torch's definition)."""
    p = posterior(case)
    W = random_w(p.n, case.seed, batch=4, classes=3)
    ours = p.post.inv_square_form(W)
    assert ours.shape == (4, 3, 3)
    X = torch.linalg.solve(p.P, W.reshape(-1, p.n).T).T.reshape(W.shape)
    ref = W @ X.transpose(1, 2)
    tol = p.bound(-1) * fro(W) ** 2
    assert fro(ours - ref) <= tol
    upstream = W @ p.post.bmm(W, -1).transpose(1, 2)
    assert fro(ours - upstream) <= 2 * tol
    assert fro(ours - ours.transpose(1, 2)) <= 2 * tol


@SETTINGS
@given(case=cases(), e=st.floats(-2.0, 2.0))
def test_diag_matches_dense_diagonal(case, e):
    """``diag(e)`` equals the diagonal of the dense ``P^e`` for e = 1, -1
    (dense ``inv``) and a drawn e in [-2, 2]."""
    p = posterior(case)
    for exponent in (1, -1, e):
        ours = p.post.diag(exponent=exponent)
        ref = p.power(exponent).diagonal()
        assert ours.shape == (p.n,)
        assert (ours - ref).abs().max().item() <= p.bound(exponent), exponent
    assert (p.post.diag(1) - p.P.diagonal()).abs().max().item() <= p.bound(1)
    inv_diag = torch.linalg.inv(p.P).diagonal()
    assert (p.post.diag(-1) - inv_diag).abs().max().item() <= p.bound(-1)


@SETTINGS
@given(case=cases(rows="deficient"))
def test_rank_deficient_factors_plus_prior_stay_pd(case):
    """With every factor built from fewer rows than its side (possibly none;
    the dense factor of each block is singular, a truncated "trace" low-rank
    one gains ``c I``) the curvature is singular, yet the posterior is PD:
    all eigenvalues of ``to_matrix()`` are >= min delta (= delta of the block
    exactly, without damping), and ``logdet`` is finite and equals slogdet."""
    p = posterior(case)
    ours = p.post.to_matrix()
    ev = torch.linalg.eigvalsh(ours)
    assert (ev > 0).all()
    b = p.bound(1)
    start = 0
    for specs, delta in zip(case.blocks, case.deltas, strict=True):
        n = math.prod(f.side for f in specs)
        block_ev = torch.linalg.eigvalsh(ours[start : start + n, start : start + n])
        start += n
        assert block_ev.min().item() >= delta - b
        if not case.damping or len(specs) == 1:  # a singular factor: singular block
            assert abs(block_ev.min().item() - delta) <= b
    logdet = p.post.logdet()
    assert torch.isfinite(logdet)
    tol = SLACK * EPS * p.evals.max().item() * p.evals.reciprocal().sum().item()
    assert abs(logdet.item() - torch.linalg.slogdet(p.P)[1].item()) <= tol


@SETTINGS
@given(case=cases(log_delta=st.sampled_from([-8.0, 8.0])))
def test_extreme_priors_give_finite_results(case):
    """Prior precisions 1e-8 and 1e8 (mixed across blocks) give a finite
    logdet, ``inv_square_form`` and ``bmm(W, -1)``, all still within the
    condition-aware bounds of the dense references."""
    p = posterior(case)
    logdet = p.post.logdet()
    assert torch.isfinite(logdet)
    tol = SLACK * EPS * p.evals.max().item() * p.evals.reciprocal().sum().item()
    assert abs(logdet.item() - torch.linalg.slogdet(p.P)[1].item()) <= tol
    W = random_w(p.n, case.seed)
    ours = p.post.inv_square_form(W)
    assert torch.isfinite(ours).all()
    X = torch.linalg.solve(p.P, W.reshape(-1, p.n).T).T.reshape(W.shape)
    assert fro(ours - W @ X.transpose(1, 2)) <= p.bound(-1) * fro(W) ** 2
    inv_w = p.post.bmm(W, -1)
    assert torch.isfinite(inv_w).all()
    assert fro(inv_w - X) <= p.bound(-1) * fro(W)


@SETTINGS
@given(case=cases(allow_lowrank=False), e=st.floats(-2.0, 2.0))
def test_all_dense_blocks_agree_with_laplace_kron_decomposed(case, e):
    """Without low-rank factors our closed forms equal laplace-torch's own
    `KronDecomposed` (same eigenpairs, deltas, damping): logdet, bmm, diag,
    inv_square_form."""
    H, _ = build_kron(case)
    ours = H.decompose(damping=case.damping) * case.scale + delta_tensor(case)
    theirs = KronDecomposed(
        ours.eigenvectors, ours.eigenvalues, ours.deltas, damping=case.damping
    )
    evals = torch.cat(
        [
            ours._dense_block(vecs, vals, d)[2].flatten()
            for vecs, vals, d in zip(
                ours.eigenvectors, ours.eigenvalues, ours.deltas, strict=True
            )
        ]
    )
    lo, hi = evals.min().item(), evals.max().item()
    W = random_w(len(evals), case.seed)
    tol_logdet = SLACK * EPS * hi * evals.reciprocal().sum().item()
    assert abs(ours.logdet().item() - theirs.logdet().item()) <= tol_logdet
    for exponent in (1, -1, -0.5, e):
        b = SLACK * EPS * max(lo**exponent, hi**exponent)
        assert fro(ours.bmm(W, exponent) - theirs.bmm(W, exponent)) <= b * fro(W)
        assert (ours.diag(exponent) - theirs.diag(exponent)).abs().max() <= b
    b = SLACK * EPS / lo
    assert fro(ours.inv_square_form(W) - theirs.inv_square_form(W)) <= b * fro(W) ** 2
