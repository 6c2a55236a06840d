"""One contract for every matrix type of `laplace_lora_backend.matrix`.

Each type is built from random data whose dense matrix is formed independently
(``rows^T rows``, `torch.kron`, `torch.block_diag`); every operation a type
offers must agree with that dense oracle in float64: its dense view, scaling
by a scalar, the diagonal, the log-determinant with a prior, and the
round trip through its state. New matrix types join by adding a `Subject`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from laplace_lora_backend.matrix import LoRAKron, LowRankFactor

DT = torch.float64


def _pd(d: int, g: torch.Generator) -> torch.Tensor:
    X = torch.randn(d + 2, d, generator=g, dtype=DT)
    return X.T @ X / d + 0.1 * torch.eye(d, dtype=DT)


@dataclass
class Subject:
    """A matrix object, its dense view and the dense oracle it must equal."""

    name: str
    build: Callable[[torch.Generator], tuple[Any, torch.Tensor]]
    dense: Callable[[Any], torch.Tensor]


def _lowrank(g):
    rows = torch.randn(7, 5, generator=g, dtype=DT)
    # rank = side: the truncated factor is exact
    return LowRankFactor.from_rows(rows, rank=5, residual="trace", dtype=DT), (
        rows.T @ rows
    )


def _kron_blocks(g):
    A, B, C, D = _pd(3, g), _pd(4, g), _pd(2, g), _pd(5, g)
    rows = torch.randn(9, 6, generator=g, dtype=DT)
    low = LowRankFactor.from_rows(rows, rank=6, residual="trace", dtype=DT)
    E = _pd(3, g)  # a bias: one factor, laplace-torch's layout
    kron = LoRAKron([[A, B], [C, D], [low, _pd(2, g)], [E]])
    ref = torch.block_diag(
        torch.kron(A, B),
        torch.kron(C, D),
        torch.kron(rows.T @ rows, kron.kfacs[2][1]),
        E,
    )
    return kron, ref


def _decomposed(g):
    kron, ref = _kron_blocks(g)
    return kron.decompose(), ref


SUBJECTS = [
    Subject("LowRankFactor", _lowrank, lambda m: m.to_dense()),
    Subject("LoRAKron", _kron_blocks, lambda m: m.to_matrix()),
    Subject("LoRAKronDecomposed", _decomposed, lambda m: m.to_matrix()),
]


@pytest.fixture(params=SUBJECTS, ids=lambda s: s.name)
def subject(request):
    return request.param


@pytest.mark.parametrize("seed", [0, 1])
def test_dense_view_is_the_oracle_and_symmetric(subject, seed):
    m, ref = subject.build(torch.Generator().manual_seed(seed))
    dense = subject.dense(m)
    assert dense.dtype == DT
    assert torch.allclose(dense, ref, rtol=1e-10, atol=1e-10)
    assert torch.allclose(dense, dense.T, atol=1e-12)


def test_scaling_by_a_scalar_scales_the_matrix(subject):
    m, ref = subject.build(torch.Generator().manual_seed(2))
    for scalar in (2.5, torch.tensor(0.3, dtype=DT)):
        expected = float(scalar) * ref
        assert torch.allclose(subject.dense(m * scalar), expected, rtol=1e-10)
        assert torch.allclose(subject.dense(scalar * m), expected, rtol=1e-10)


def test_diagonal_is_the_oracles(subject):
    m, ref = subject.build(torch.Generator().manual_seed(3))
    if not hasattr(m, "diag"):
        pytest.skip(f"{subject.name} has no diag()")
    assert torch.allclose(m.diag(), ref.diagonal(), rtol=1e-10)


def test_logdet_with_a_prior_is_the_oracles(subject):
    m, ref = subject.build(torch.Generator().manual_seed(4))
    if not hasattr(m, "logdet"):
        pytest.skip(f"{subject.name} has no logdet()")
    if subject.name == "LoRAKron":  # the curvature alone (nonsingular here)
        got, dense = m.logdet(), ref
    else:  # a decomposed posterior: curvature + prior precision per block
        delta = torch.tensor([0.5, 2.0, 0.1, 3.0], dtype=DT)
        sides = [12, 10, 12, 3]
        got = (m + delta).logdet()
        dense = ref + torch.diag(torch.repeat_interleave(delta, torch.tensor(sides)))
    assert torch.allclose(got, torch.linalg.slogdet(dense)[1], rtol=1e-10)


def test_state_round_trip(subject):
    m, ref = subject.build(torch.Generator().manual_seed(5))
    if not hasattr(m, "to_state"):
        pytest.skip(f"{subject.name} has no state (rebuilt by decompose())")
    back = type(m).from_state(m.to_state())
    assert torch.equal(subject.dense(back), subject.dense(m))
