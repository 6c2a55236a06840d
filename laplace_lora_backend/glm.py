"""Jacobians of the GLM predictive, computed once and reused.

The GLM predictive of a Laplace posterior is ``f ~ N(f*(x), J Sigma J^T)``:
the Jacobians `J` and the mean ``f*(x)`` do not depend on the prior precision,
only the covariance does. A `JacobianBatch` holds them for one batch, so that
the predictive can be evaluated for many prior precisions (grid search, the
``"auto"`` prior mode) without a forward or backward pass:
``la(jacobian_batch, link_approx=...)`` equals ``la(x, link_approx=...)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

__all__ = [
    "JacobianBatch",
    "center_logits",
    "gaussian_samples",
    "jacobian_batches",
    "probit",
    "psd_factor",
]


@dataclass
class JacobianBatch:
    """GLM Jacobians and mean of one batch (prior-independent).

    Attributes
    ----------
    Js : torch.Tensor
        `(batch, outputs, P)` Jacobians of the outputs w.r.t. the posterior's
        parameters, or `(batch, features, P)` Jacobians of the features when
        `head` is set.
    f : torch.Tensor
        `(batch, outputs)` outputs at the posterior mean (features with `head`).
    head : tuple[torch.Tensor, torch.Tensor or None] or None
        `(W, b)`: the outputs are ``f @ W.T + b`` (a fixed linear head read
        through features; see `AnswerTokenClassifier.linear_head`).
    """

    Js: torch.Tensor
    f: torch.Tensor
    head: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def to(self, device: torch.device | str) -> JacobianBatch:
        """The batch on `device` (laplace-torch moves inputs with `.to`).

        Returns
        -------
        JacobianBatch
            A new batch with every tensor moved to `device`.
        """
        head = None
        if self.head is not None:
            W, b = self.head
            head = (W.to(device), None if b is None else b.to(device))
        return JacobianBatch(self.Js.to(device), self.f.to(device), head)

    def __len__(self) -> int:
        return self.f.shape[0]

    def mean(self) -> torch.Tensor:
        """GLM mean of the outputs: the model's outputs at the posterior mean.

        Returns
        -------
        torch.Tensor
            `(batch, C)` (through the linear head when `head` is set).
        """
        if self.head is None:
            return self.f
        W, b = (t.to(self.f.dtype) if t is not None else None for t in self.head)
        return self.f @ W.T if b is None else self.f @ W.T + b

    def moments(
        self, functional_variance, diagonal_output: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """GLM mean `(batch, C)` and covariance `(batch, C, C)` of the outputs.

        Parameters
        ----------
        functional_variance : callable
            ``Js -> (batch, k, k)`` covariance of the posterior (the Laplace
            object's `functional_variance`).
        diagonal_output : bool, default=False
            Return the variances `(batch, C)` only.

        Returns
        -------
        tuple[torch.Tensor, torch.Tensor]
            Detached copies of the mean `(batch, C)` and the covariance
            `(batch, C, C)` (the variances `(batch, C)` with `diagonal_output`).
        """
        var = functional_variance(self.Js)
        mu = self.mean()
        if self.head is not None:
            W = self.head[0].to(self.f.dtype)
            var = W @ var @ W.T
        if diagonal_output:
            var = torch.diagonal(var, dim1=-2, dim2=-1)
        # copies: laplace-torch's bridge link edits the moments in place
        return mu.detach().clone(), var.detach().clone()


def jacobian_batches(
    la: Any,
    loader: Iterable,
    dict_key_y: str = "labels",
    progress_bar: bool = False,
    desc: str = "[Jacobians]",
) -> list[tuple[JacobianBatch, torch.Tensor]]:
    """`(JacobianBatch, y)` for every batch of `loader` (one pass over it).

    Parameters
    ----------
    la : LoRALaplace
        A fitted LoRA Laplace object (its `jacobian_batch` method is used).
    loader : Iterable
        Batches of `(X, y)` or dicts with `dict_key_y`; `X` may already be a
        `JacobianBatch` (the output of this function can be passed again).
    dict_key_y : str, default='labels'
    progress_bar : bool, default=False
    desc : str
        Progress bar label.

    Returns
    -------
    list[tuple[JacobianBatch, torch.Tensor]]
        Ready to be iterated like a validation loader.

    Raises
    ------
    ValueError
        If a batch has no targets.
    """
    out = []
    for data in tqdm(loader, desc=desc, disable=not progress_bar):
        if isinstance(data, MutableMapping):
            if dict_key_y not in data:
                raise ValueError(
                    f"The validation batch has no key {dict_key_y!r} (keys: "
                    f"{sorted(data)}); the prior is tuned on labelled data."
                )
            X, y = data, data[dict_key_y]
        else:
            X, y = data
        if not isinstance(X, JacobianBatch):  # already cached: reused as is
            X = la.jacobian_batch(X)
        out.append((X, torch.as_tensor(y)))
    return out


def center_logits(
    f_mu: torch.Tensor, f_var: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Project a Gaussian over logits onto the zero-sum subspace.

    The softmax does not change when a constant is added to every logit, so
    ``f ~ N(mu, S)`` and ``P f`` with ``P = I - 1 1^T / C`` give the same
    distribution over class probabilities. Returns ``(P mu, P S P)``.

    Parameters
    ----------
    f_mu : torch.Tensor
        `(batch, C)` logit means.
    f_var : torch.Tensor
        `(batch, C, C)` logit covariances.

    Returns
    -------
    tuple[torch.Tensor, torch.Tensor]
        `(batch, C)` and `(batch, C, C)`.
    """
    mu = f_mu - f_mu.mean(-1, keepdim=True)
    var = f_var - f_var.mean(-1, keepdim=True)
    var = var - var.mean(-2, keepdim=True)
    return mu, var


def probit(
    f_mu: torch.Tensor, f_var: torch.Tensor, centered: bool = True
) -> torch.Tensor:
    r"""Probit approximation of ``E[softmax(f)]`` for ``f ~ N(f_mu, f_var)``.

    ``softmax(mu_c / sqrt(1 + pi/8 var_cc))``. With ``centered=True`` the
    Gaussian is first projected onto zero-sum logits (`center_logits`): the
    same predictive distribution, but a variance that moves every logit
    together (common for the answer-token logits of an LLM) no longer scales
    the logits by class-dependent factors, which reorders the classes of
    logits far from zero. ``centered=False`` is laplace-torch's probit.

    Parameters
    ----------
    f_mu : torch.Tensor
        `(batch, C)`.
    f_var : torch.Tensor
        `(batch, C, C)`.
    centered : bool, default=True

    Returns
    -------
    torch.Tensor
        `(batch, C)` probabilities.
    """
    if centered:
        f_mu, f_var = center_logits(f_mu, f_var)
    kappa = 1 / torch.sqrt(1.0 + math.pi / 8 * f_var.diagonal(dim1=-2, dim2=-1))
    return torch.softmax(kappa * f_mu, dim=-1)


def psd_factor(var: torch.Tensor) -> torch.Tensor:
    """`L` with ``var = L L^T`` for a positive semi-definite (singular) `var`.

    Eigendecomposition with negative rounding clamped to 0 (a Cholesky fails on
    the zero-sum logits' singular covariance).

    Returns
    -------
    torch.Tensor
        `var.shape`.
    """
    w, V = torch.linalg.eigh(var)
    return V * w.clamp_min(0).sqrt().unsqueeze(-2)


def gaussian_samples(
    f_mu: torch.Tensor,
    f_var: torch.Tensor,
    n_samples: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Samples of ``N(f_mu, f_var)`` per example (covariance may be singular).

    Parameters
    ----------
    f_mu : torch.Tensor
        `(batch, C)`.
    f_var : torch.Tensor
        `(batch, C, C)` positive semi-definite.
    n_samples : int
    generator : torch.Generator, optional

    Returns
    -------
    torch.Tensor
        `(n_samples, batch, C)`, in `f_mu`'s dtype.
    """
    L = psd_factor(f_var.double())
    z = torch.randn(
        n_samples, *f_mu.shape, generator=generator, dtype=torch.float64
    ).to(f_mu.device)
    return (f_mu.double() + torch.einsum("bij,sbj->sbi", L, z)).to(f_mu.dtype)
