"""Low-rank-plus-isotropic Kronecker algebra against dense `to_matrix()`
references, float64 (the linear_operator pattern: one dense oracle)."""

from __future__ import annotations

import pytest
import torch
from helpers import rel_err
from laplace.utils import Kron

from laplace_lora_backend.curvature.factors import LowRankAccumulator
from laplace_lora_backend.matrix import LoRAKron, LowRankFactor

TOL = 1e-6


@pytest.fixture(autouse=True)
def float64_default():
    """float64 by default in this module only (restored for other tests)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def random_rows(n, d, rank=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    if rank is None:
        return torch.randn(n, d, generator=g)
    return torch.randn(n, rank, generator=g) @ torch.randn(rank, d, generator=g)


def lowrank(rows, k, residual="trace"):
    acc = LowRankAccumulator(rows.shape[1], k, residual, torch.float64, "cpu")
    acc.add(rows)
    return acc.value()


def make_kron(k, residual, wide_side, n_small=4, d=40, seed=0):
    """Blocks [dense small, low-rank wide] and [low-rank wide, dense small],
    plus one all-dense block."""
    small = random_rows(30, n_small, seed=seed + 1)
    S = small.T @ small
    wide = lowrank(random_rows(60, d, seed=seed + 2), k, residual)
    D = random_rows(20, 3, seed=seed + 3)
    blocks = [
        [S, wide] if wide_side == "in" else [wide, S],
        [wide * 0.5, S * 2.0] if wide_side == "in" else [S * 2.0, wide * 0.5],
        [D.T @ D, torch.eye(2) + 0.1 * torch.ones(2, 2)],
    ]
    return LoRAKron(blocks)


CASES = [
    (k, residual, side)
    for k in (3, 12)
    for residual in ("trace", "none")
    for side in ("in", "out")
]


@pytest.mark.parametrize("k, residual, side", CASES)
@pytest.mark.parametrize("damping", [False, True])
def test_identities_against_dense(k, residual, side, damping):
    """logdet, bmm (e = 1, -1, -1/2), inv_square_form and diag equal the same
    quantities computed from the dense matrix, for scalar and per-block priors."""
    H = make_kron(k, residual, side)
    dense_H = H.to_matrix()
    P = dense_H.shape[0]
    for delta in (torch.tensor(0.3), torch.tensor([0.2, 1.5, 0.7])):
        post = H.decompose(damping=damping) * 1.7 + delta
        dense = post.to_matrix()
        if not damping:
            per_param = torch.cat(
                [
                    torch.full((F[0].shape[0] * F[1].shape[0],), float(d))
                    for F, d in zip(H.kfacs, delta.expand(3), strict=True)
                ]
            )
            assert rel_err(dense, 1.7 * dense_H + torch.diag(per_param)) < 1e-10
        evals, evecs = torch.linalg.eigh(dense)

        def power(e, evals=evals, evecs=evecs):
            return evecs @ torch.diag(evals.pow(e)) @ evecs.T

        assert abs(post.logdet() - torch.logdet(dense)) / abs(torch.logdet(dense)) < TOL
        W = torch.randn(5, 2, P)
        for e in (1, -1, -0.5):
            ref = torch.einsum("pq,bcq->bcp", power(e), W)
            assert rel_err(post.bmm(W, exponent=e), ref) < TOL
            assert rel_err(post.diag(exponent=e), torch.diagonal(power(e))) < TOL
        ref = torch.einsum("bcp,pq,bkq->bck", W, power(-1), W)
        assert rel_err(post.inv_square_form(W), ref) < TOL


def test_full_rank_equals_dense_kron():
    """With rank >= d the low-rank path equals laplace-torch's dense Kron."""
    rows = random_rows(50, 12)
    S = random_rows(20, 3, seed=5)
    S = S.T @ S
    dense = Kron([[S, rows.T @ rows]]).decompose() + torch.tensor(0.4)
    ours = LoRAKron([[S, lowrank(rows, 12)]]).decompose() + torch.tensor(0.4)
    assert abs(ours.logdet() - dense.logdet()) < 1e-10
    W = torch.randn(3, 1, 36)
    for e in (1, -1, -0.5):
        assert rel_err(ours.bmm(W, e), dense.bmm(W, e)) < 1e-10
    assert rel_err(ours.diag(-1), dense.diag(-1)) < 1e-10


def test_samples_have_the_dense_covariance():
    """P^{-1/2} z for many z has covariance P^{-1} (statistical bound)."""
    H = make_kron(3, "trace", "in", d=10)
    post = H.decompose() + torch.tensor(0.5)
    torch.manual_seed(0)
    n = 200_000
    z = torch.randn(n, post.to_matrix().shape[0])
    samples = post.bmm(z, exponent=-0.5)
    cov = samples.T @ samples / n
    ref = post.to_matrix(exponent=-1)
    # Monte-Carlo error of a covariance entry ~ sqrt(2/n) * max variance
    assert (cov - ref).abs().max() < 6 * (2 / n) ** 0.5 * ref.diagonal().max()


def test_streaming_is_exact_when_data_rank_is_at_most_k():
    """Streaming over many small chunks equals a one-shot eigendecomposition
    when the rows span <= k dimensions."""
    rows = random_rows(300, 64, rank=10)
    acc = LowRankAccumulator(64, 16, "trace", torch.float64, "cpu", chunk=7)
    for part in rows.split(23):
        acc.add(part)
    F = acc.value()
    assert rel_err(F.to_dense(), rows.T @ rows) < 1e-10
    assert F.discarded_trace < 1e-8 * F.trace


def test_streaming_error_is_reported_and_bounded():
    """Above rank k streaming is approximate: report its error against the
    one-shot truncated eigendecomposition and bound it."""
    g = torch.Generator().manual_seed(0)
    scales = torch.logspace(0, -3, 64)
    rows = torch.randn(400, 64, generator=g) * scales
    exact = rows.T @ rows
    acc = LowRankAccumulator(64, 16, "none", torch.float64, "cpu", chunk=32)
    for part in rows.split(50):
        acc.add(part)
    stream = acc.value().to_dense()
    ev, Q = torch.linalg.eigh(exact)
    oneshot = Q[:, -16:] @ torch.diag(ev[-16:]) @ Q[:, -16:].T
    err_stream = torch.linalg.matrix_norm(exact - stream, 2) / ev[-1]
    err_oneshot = torch.linalg.matrix_norm(exact - oneshot, 2) / ev[-1]
    gap = torch.linalg.matrix_norm(stream - oneshot, 2) / ev[-1]
    print(
        f"streaming error {err_stream:.2e}, one-shot {err_oneshot:.2e}, "
        f"streaming vs one-shot {gap:.2e}"
    )
    assert err_oneshot <= err_stream + 1e-12
    assert err_stream < 2 * err_oneshot + 1e-3


def test_trace_residual_preserves_trace_and_none_drops_it():
    rows = random_rows(80, 30)
    F_trace = lowrank(rows, 5, "trace")
    F_none = lowrank(rows, 5, "none")
    tr = (rows**2).sum()
    assert torch.allclose(torch.trace(F_trace.to_dense()), tr)
    assert torch.allclose(torch.trace(F_none.to_dense()), F_none.s.sum())
    assert F_none.c == 0 and F_trace.c > 0


def test_merge_equals_accumulating_everything():
    a, b = random_rows(40, 20, rank=3, seed=1), random_rows(30, 20, rank=4, seed=2)
    merged = lowrank(a, 8) + lowrank(b, 8)
    assert rel_err(merged.to_dense(), a.T @ a + b.T @ b) < 1e-10
    assert torch.allclose(merged.trace, (a**2).sum() + (b**2).sum())


def test_scalar_multiplication_and_state_round_trip():
    H = make_kron(4, "trace", "out")
    H2 = H * 3.0
    assert rel_err(H2.to_matrix(), 3.0 * H.to_matrix()) < 1e-12
    back = LoRAKron.from_state(H.to_state())
    assert rel_err(back.to_matrix(), H.to_matrix()) == 0
    assert isinstance(back.kfacs[0][0], LowRankFactor)


def test_equal_factors_are_decomposed_once_with_the_same_result(monkeypatch):
    """q and v read the same input: their equal input factors share one eigh,
    and the decomposition equals laplace-torch's Kron.decompose factor by
    factor."""
    import laplace_lora_backend.matrix.kron as kron_module

    g = torch.Generator().manual_seed(0)

    def psd(d):
        X = torch.randn(d + 3, d, generator=g, dtype=torch.float64)
        return X.T @ X

    A = psd(6)
    blocks = [[psd(2), A], [psd(2), A.clone()], [psd(2), psd(6)]]
    calls = []
    symeig = kron_module.symeig
    monkeypatch.setattr(kron_module, "symeig", lambda F: calls.append(F) or symeig(F))
    ours = LoRAKron(blocks).decompose()
    assert len(calls) == 5  # 6 dense factors, two of them equal
    ref = Kron([[F.clone() for F in b] for b in blocks]).decompose()
    for b, (Qs, ls) in enumerate(zip(ours.eigenvectors, ours.eigenvalues, strict=True)):
        for i, (Q, lam) in enumerate(zip(Qs, ls, strict=True)):
            assert torch.equal(lam, ref.eigenvalues[b][i])
            assert torch.equal(Q, ref.eigenvectors[b][i])
    dense = Kron([[F.clone() for F in b] for b in blocks]).to_matrix()
    assert rel_err(ours.to_matrix(), dense) < 1e-10
