"""The LoRA Laplace classes of each Hessian structure.

`LoRAKronLaplace`, `LoRADiagLaplace` and `LoRAFullLaplace` are `LoRALaplace`
combined with laplace-torch's `KronLaplace`, `DiagLaplace` and `FullLaplace`;
each has its own `_key`, so importing this package adds ``("lora", "kron")``,
``("lora", "diag")`` and ``("lora", "full")`` to `laplace.Laplace` and leaves
upstream's keys untouched. Structure-specific code (Kronecker factors, their
low-rank options, state and the distributed combine) lives here.
"""

from __future__ import annotations

from typing import Any

import torch
from laplace import DiagLaplace, FullLaplace, KronLaplace
from laplace.curvature import CurvatureInterface
from laplace.utils import Likelihood

from laplace_lora_backend.distributed import reduce_factor
from laplace_lora_backend.loralaplace import LoRALaplace
from laplace_lora_backend.matrix import LoRAKron
from laplace_lora_backend.matrix.lowrank_options import (
    DEFAULT_LOWRANK_THRESHOLD,
    LowRankOptions,
)
from laplace_lora_backend.validation import LoRAModules

__all__ = ["LoRAKronLaplace", "LoRADiagLaplace", "LoRAFullLaplace"]


def _factor_sum(F: Any) -> torch.Tensor:
    """A scalar whose finiteness is that of factor `F` (dense or low-rank).

    Returns
    -------
    torch.Tensor
        Scalar: the sum of the entries (of `U`, `s`, `trace` if low-rank).
    """
    if isinstance(F, torch.Tensor):
        return F.sum()
    return sum(v.sum() for v in F.to_state().values() if isinstance(v, torch.Tensor))


class LoRAKronLaplace(LoRALaplace, KronLaplace):
    """K-FAC Laplace over the LoRA weights (`laplace.KronLaplace` semantics).

    Wide Kronecker factors (the input factor of `lora_A`, the output factor of
    `lora_B` on a wide projection) are kept as streaming low-rank-plus-
    isotropic factors (`LowRankFactor`); see `LoRAKron` / `LoRAKronDecomposed`.

    Parameters
    ----------
    model, likelihood, sigma_noise, prior_precision, prior_mean, temperature
        See `LoRALaplace`.
    enable_backprop, dict_key_x, dict_key_y, backend
        See `LoRALaplace`.
    damping : bool, default=False
        laplace-torch's `KronLaplace` damping.
    backend_kwargs, asdl_fisher_kwargs, lora_modules, modules_to_save, process_group
        See `LoRALaplace`.
    center_logits : bool, default=True
        See `LoRALaplace`.
    lowrank_threshold : int or None, default=1024
        Factors whose side is `>=` this are low-rank; `None`: all dense. The
        default is where low-rank factors start to pay in time (below it a
        dense factor is faster, exact and at most 4 MiB); see
        `laplace_lora_backend.matrix.lowrank_options.DEFAULT_LOWRANK_THRESHOLD`.
    lowrank_rank : int, default=16
        Rank `k` kept for each low-rank factor.
    lowrank_residual : {'trace', 'none'}, default='trace'
        Keep the spectrum truncation discards as ``c I`` (trace-preserving) or
        drop it (its directions then fall back to the prior).
    """

    # key to map to this class in laplace.Laplace: (subset_of_weights, structure)
    _key = ("lora", "kron")
    _unfitted_is_prior = False  # as KronLaplace: no factors before fit
    per_parameter_prior = False  # KronLaplace: scalar or per-layer only

    def __init__(
        self,
        model: torch.nn.Module,
        likelihood: Likelihood | str,
        sigma_noise: float | torch.Tensor = 1.0,
        prior_precision: float | torch.Tensor = 1.0,
        prior_mean: float | torch.Tensor = 0.0,
        temperature: float = 1.0,
        enable_backprop: bool = False,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        backend: type[CurvatureInterface] | None = None,
        damping: bool = False,
        backend_kwargs: dict[str, Any] | None = None,
        asdl_fisher_kwargs: dict[str, Any] | None = None,
        *,
        lora_modules: LoRAModules = None,
        modules_to_save: bool | None = None,
        process_group: Any = None,
        center_logits: bool = True,
        lowrank_threshold: int | None = DEFAULT_LOWRANK_THRESHOLD,
        lowrank_rank: int = 16,
        lowrank_residual: str = "trace",
    ) -> None:
        # validated here, before anything else is built
        self.lowrank = LowRankOptions(lowrank_threshold, lowrank_rank, lowrank_residual)
        self.lowrank_options = {
            "lowrank_threshold": lowrank_threshold,
            "lowrank_rank": lowrank_rank,
            "lowrank_residual": self.lowrank.residual.value,
        }
        super().__init__(
            model,
            likelihood,
            sigma_noise=sigma_noise,
            prior_precision=prior_precision,
            prior_mean=prior_mean,
            temperature=temperature,
            enable_backprop=enable_backprop,
            dict_key_x=dict_key_x,
            dict_key_y=dict_key_y,
            backend=backend,
            backend_kwargs=backend_kwargs,
            asdl_fisher_kwargs=asdl_fisher_kwargs,
            lora_modules=lora_modules,
            modules_to_save=modules_to_save,
            process_group=process_group,
            center_logits=center_logits,
            damping=damping,
        )

    def _lora_options(self) -> dict[str, Any]:
        return dict(self.lowrank_options)

    def constructor_settings(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this object (with `damping`).

        Returns
        -------
        dict[str, Any]
            `PosteriorIO.constructor_settings` plus ``damping``.
        """
        return {**super().constructor_settings(), "damping": self.damping}

    def _init_H(self) -> None:
        if self._uses_lora_backend:
            self.H = self.backend.init_kron()
        else:  # a laplace-torch backend on the LoRA weights
            super()._init_H()

    def _curvature_per_weight(self) -> list[torch.Tensor]:
        return [
            torch.stack([_factor_sum(F) for F in block]) for block in self.H_facs.kfacs
        ]

    def _reduce_curvature(self, group: Any, input_scale: float) -> None:
        # [F_out (summed), F_in (mean over N)]; bias blocks hold F_out only
        blocks = []
        for b in self.H_facs.kfacs:
            scales = (1.0, input_scale) if len(b) == 2 else (1.0,)
            blocks.append(
                [reduce_factor(F, c, group) for F, c in zip(b, scales, strict=True)]
            )
        self.H_facs = type(self.H_facs)(blocks)
        self.H = self.H_facs.decompose(damping=self.damping)

    def _init_empty_fit(self, n_outputs: int) -> None:
        super()._init_empty_fit(n_outputs)
        self.H_facs = self.H

    def state_dict(self) -> dict[str, Any]:
        """State with low-rank factors stored as plain tensors and numbers.

        Returns
        -------
        dict[str, Any]
            laplace-torch's state; ``"H"`` as `LoRAKron.to_state` when the
            factors are a `LoRAKron` (LoRA backends).
        """
        state = super().state_dict()
        if isinstance(self.H_facs, LoRAKron):
            state["H"] = self.H_facs.to_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a `state_dict` (dense or low-rank factors)."""
        if self._uses_lora_backend:  # factor objects, as KronLaplace expects
            state_dict = {
                **state_dict,
                "H": LoRAKron.from_state(state_dict["H"]).kfacs,
            }
        super().load_state_dict(state_dict)


class LoRADiagLaplace(LoRALaplace, DiagLaplace):
    """Diagonal Laplace over the LoRA weights (`laplace.DiagLaplace` semantics)."""

    # key to map to this class in laplace.Laplace: (subset_of_weights, structure)
    _key = ("lora", "diag")


class LoRAFullLaplace(LoRALaplace, FullLaplace):
    """Full-covariance Laplace over the LoRA weights (small adapters only)."""

    # key to map to this class in laplace.Laplace: (subset_of_weights, structure)
    _key = ("lora", "full")
