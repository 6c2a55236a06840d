"""K-FAC of the LoRA weights from module hooks: the `LoRAKFAC` mixin.

One forward pass records each LoRA linear's input; the input factors are
built from those (once per distinct input tensor). Then one backward pass per
``(scalar, weight)`` pair of the curvature type's `_output_gradient_passes`
(one per output for the exact GGN, per sample for the MC Fisher, one for the
empirical Fisher) feeds the output gradients into the output factors. Wide
factors are accumulated as streaming low-rank factors (`LowRankOptions`).
"""

from __future__ import annotations

import math
from collections.abc import MutableMapping
from typing import Any

import torch

from laplace_lora_backend.curvature.checks import check_finite
from laplace_lora_backend.curvature.discovery import grad_enabled
from laplace_lora_backend.curvature.factors import DenseFactor, LowRankAccumulator
from laplace_lora_backend.curvature.jacobians import Batch
from laplace_lora_backend.curvature.token_loss import target_mask
from laplace_lora_backend.curvature.tokens import (
    KFACApprox,
    parse_kfac_approx,
    token_rows,
)
from laplace_lora_backend.matrix import LoRAKron

__all__ = ["LoRAKFAC"]


class LoRAKFAC:
    """K-FAC of the LoRA weights: a mixin of `LoRAInterface`.

    Uses the host's `lora_weights`, `params`, `compute_dtype`, `lowrank`,
    `kfac_approx`, `mask_key`, `factor` and `_names`, its helpers
    `_recorder`, `_forward`, `_checked_inputs` and `_loss`, and the curvature
    type's `_output_gradient_passes`.
    """

    def _new_factor(self, dim: int, lowrank: bool) -> DenseFactor | LowRankAccumulator:
        """Accumulator for a factor of side `dim`.

        Returns
        -------
        DenseFactor or LowRankAccumulator
            Empty, in `compute_dtype` on the LoRA weights' device; low-rank
            if `lowrank` (`LowRankOptions.lowrank_sides`).
        """
        dtype, device = self.compute_dtype, self.params[0].device
        if lowrank:
            return LowRankAccumulator(
                dim, self.lowrank.rank, self.lowrank.residual, dtype, device
            )
        return DenseFactor(dim, dtype, device)

    def _sides(self, w) -> tuple[bool, ...]:
        return self.lowrank.lowrank_sides(tuple(w.param.shape))

    def init_kron(self) -> LoRAKron:
        """Zero `LoRAKron` with this backend's dense / low-rank layout.

        Returns
        -------
        LoRAKron
            One zero block ``[F_out, F_in]`` per weight (``[F]`` for a bias).
        """
        return LoRAKron.init_from_shapes(
            [tuple(w.param.shape) for w in self.lora_weights],
            self.compute_dtype,
            self.params[0].device,
            self.lowrank,
        )

    def _mask(self, x: Batch, y: torch.Tensor | None = None) -> torch.Tensor | None:
        """`(batch, tokens)` mask of the token rows, or None (all count).

        The attention mask (`mask_key`); with `(batch, tokens)` next-token
        targets, only positions with a target count (a token is a sample:
        an input and its next token).

        Returns
        -------
        torch.Tensor or None
        """
        mask = None
        if self.mask_key is not None and isinstance(x, MutableMapping):
            mask = x.get(self.mask_key)
            mask = None if mask is None else torch.as_tensor(mask)
        if y is not None and y.ndim == 2 and not y.is_floating_point():
            has_target = target_mask(y)
            if mask is None:
                mask = has_target
            elif mask.shape == has_target.shape:  # else: the loss raises
                mask = mask.bool() & has_target
        return mask

    def _backward(self, scalar: torch.Tensor, retain_graph: bool) -> None:
        torch.autograd.grad(
            scalar, self.params, retain_graph=retain_graph, allow_unused=True
        )

    def kron(
        self, x: Batch, y: torch.Tensor, N: int, **kwargs: Any
    ) -> tuple[torch.Tensor, LoRAKron]:
        """K-FAC of the LoRA weights on one batch (laplace-torch convention).

        Parameters
        ----------
        x : torch.Tensor or MutableMapping
            Batch on the model's device.
        y : torch.Tensor
            Targets `(batch,)` (classification) or `(batch, outputs)`; for
            `(batch, tokens, vocab)` logits, `(batch, tokens)` next-token ids
            (`laplace_lora_backend.curvature.token_loss`).
        N : int
            Data set size.
        **kwargs
            ``kfac_approx`` and ``mc_samples`` (MC Fisher) override the
            backend's settings (laplace-torch passes ``asdl_fisher_kwargs``
            here); others are ignored.

        Returns
        -------
        loss : torch.Tensor
            `factor * summed loss`.
        kron : LoRAKron
            One block ``[F_out, F_in]`` per weight, ``[F_out]`` for a head's
            bias (a `laplace.utils.Kron`;
            wide factors are `LowRankFactor` if `lowrank_threshold` is set).
        """
        approx = parse_kfac_approx(kwargs.get("kfac_approx", self.kfac_approx))
        mask = self._mask(x, y)
        with torch.enable_grad(), grad_enabled(self.lora_weights):
            with self._recorder(x) as rec:
                f = self._forward(x, tokens=True)
                inputs = self._checked_inputs(rec, f)
                in_factors = self._input_factors(inputs, mask, approx)
                out_factors = [
                    self._new_factor(w.out_features, self._sides(w)[0])
                    for w in self.lora_weights
                ]
                loss = self._loss(f, y)
                passes = list(
                    self._output_gradient_passes(f, y, kwargs.get("mc_samples"))
                )
                for k, (scalar, weight) in enumerate(passes):

                    def on_grad(i, g, weight=weight):
                        if not bool(torch.isfinite(g).all()):
                            check_finite([g], [self._names[i]], "output gradients")
                        g = g.to(self.compute_dtype)
                        rows, w = token_rows(g, mask, approx, is_input=False)
                        if weight != 1.0:
                            rows = rows * math.sqrt(weight)
                        out_factors[i].add(rows, w)

                    rec.on_grad = on_grad
                    self._backward(scalar, retain_graph=k < len(passes) - 1)
        blocks = [
            # input factor: batch mean * M / N; a bias: the output factor alone
            [G.value()] if A is None else [G.value(), A.value(1.0 / N)]
            for G, A in zip(out_factors, in_factors, strict=True)
        ]
        kron = LoRAKron(blocks)
        kron *= self.factor
        return self.factor * loss.detach(), kron

    def _input_factors(
        self,
        inputs: list[torch.Tensor],
        mask: torch.Tensor | None,
        approx: KFACApprox,
    ) -> list[DenseFactor | LowRankAccumulator | None]:
        """Input factors, one accumulator per distinct input tensor.

        The q, k and v projections of a layer share their input, so their
        `lora_A` input factors are computed once. A bias has none (its input
        is a constant 1: its block is the output factor alone, as in
        laplace-torch).

        Returns
        -------
        list[DenseFactor or LowRankAccumulator or None]
            One per weight (shared inputs share the same object).
        """
        factors: list[DenseFactor | LowRankAccumulator | None] = []
        seen: dict[tuple, DenseFactor | LowRankAccumulator] = {}
        for w, a in zip(self.lora_weights, inputs, strict=True):
            if w.is_bias:
                factors.append(None)
                continue
            low = self._sides(w)[1]
            key = (a.data_ptr(), tuple(a.shape), a.stride(), a.dtype, low)
            if key not in seen:
                acc = self._new_factor(w.in_features, low)
                a = a.to(self.compute_dtype)
                acc.add(*token_rows(a, mask, approx, is_input=True))
                seen[key] = acc
            factors.append(seen[key])
        return factors
