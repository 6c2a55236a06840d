"""Curvature backend for LoRA layers: K-FAC, diagonal, full, Jacobians.

`LoRAGGN` and `LoRAEF` follow laplace-torch's backend contract
(`laplace.curvature.CurvatureInterface`): every method returns the loss and
the curvature SUMMED over the batch, for ``CrossEntropyLoss(reduction="sum")``
(classification) or ``0.5 * MSELoss(reduction="sum")`` (regression). Kronecker
blocks come one per LoRA weight in `model.named_parameters()` order, as
``[F_out, F_in]`` with the output-gradient factor summed over the batch and the
input factor averaged and multiplied by ``M / N`` (batch size over data set
size), so that summing over batches gives
``(sum g g^T) (x) (1/N sum a a^T)``: laplace-torch's Kron convention, which
Curvlinops' K-FAC follows too. They therefore also work as ``backend=`` for
laplace-torch's own `KronLaplace`, `DiagLaplace` and `FullLaplace` on a PEFT
model whose only trainable weights are the LoRA weights.

All quantities come from module hooks on the `lora_A` / `lora_B` linears
(`ActivationRecorder`): one forward pass, then one backward pass per class
(exact GGN), per Monte-Carlo sample (MC Fisher) or one (empirical Fisher).
Examples in a batch must be independent (true for transformers in eval mode).

Models in float16 / bfloat16 are supported: activations and gradients are cast
to float32 before they enter factors, Jacobians and losses (`compute_dtype`),
and the low-rank factors' SVDs run in float64.
"""

from __future__ import annotations

import math
import re
from collections.abc import MutableMapping, Sequence
from typing import Any

import torch
from laplace.curvature import CurvatureInterface, EFInterface, GGNInterface
from laplace.utils import Likelihood
from torch import nn

from laplace_lora_backend.curvature.checks import check_finite, check_targets
from laplace_lora_backend.curvature.discovery import (
    LoRAWeight,
    find_lora_weights,
    grad_enabled,
)
from laplace_lora_backend.curvature.hooks import ActivationRecorder
from laplace_lora_backend.curvature.jacobians import Batch, LoRAJacobians
from laplace_lora_backend.curvature.kfac import LoRAKFAC
from laplace_lora_backend.curvature.token_loss import (
    EXACT_GGN_OF_TOKENS,
    check_index_rank,
    sample_token_labels,
    token_cross_entropy,
)
from laplace_lora_backend.curvature.tokens import KFACApprox, parse_kfac_approx
from laplace_lora_backend.matrix import LowRankResidual
from laplace_lora_backend.matrix.lowrank_options import LowRankOptions

__all__ = ["LoRAInterface", "LoRAGGN", "LoRAEF"]


class LoRAInterface(LoRAJacobians, LoRAKFAC, CurvatureInterface):
    """Curvature of the LoRA weights of a PEFT model, from module hooks.

    Jacobians and per-example gradients come from `LoRAJacobians`, K-FAC
    (`kron`, `init_kron`) from `LoRAKFAC`.

    Parameters
    ----------
    model : torch.nn.Module
        Model containing PEFT LoRA layers; ``model(x)`` must return
        `(batch, outputs)`.
    likelihood : {'classification', 'regression'}
    last_layer : bool, default=False
        Not supported (use ``lora_modules=["lm_head"]`` for last-layer LoRA).
    subnetwork_indices : None
        Not supported.
    dict_key_x : str, default='input_ids'
    dict_key_y : str, default='labels'
    lora_modules : str or list[str] or re.Pattern, optional
        Restrict the LoRA layers (see `find_lora_weights`).
    modules_to_save : bool or None, default=None
        Whether PEFT's ``modules_to_save`` heads join (see
        `find_lora_weights`; None means True).
    kfac_approx : {'expand', 'reduce'}, default='expand'
        Token aggregation for K-FAC (see `laplace_lora_backend.curvature.tokens`).
    mask_key : str or None, default='attention_mask'
        Key of the `(batch, tokens)` padding mask in dict batches; padding
        positions are excluded from the K-FAC factors. `None` disables masking.
    lowrank_threshold : int or None, default=None
        Kronecker factors whose side is `>= lowrank_threshold` are kept as
        streaming rank-`lowrank_rank` factors (`LowRankFactor`); `None` keeps
        all factors dense (laplace-torch's `Kron`-compatible default).
        `LoRAKronLaplace` passes its own default (1024).
    lowrank_rank : int, default=16
        Rank `k` of the low-rank factors.
    lowrank_residual : {'trace', 'none'}, default='trace'
        Keep the spectrum truncation discards as an isotropic ``c I``
        (``'trace'``) or drop it (``'none'``).

    Attributes
    ----------
    compute_dtype : torch.dtype
        dtype of factors, Jacobians and losses: float32 for float16 / bfloat16
        LoRA weights, else the weights' dtype.
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: Likelihood | str,
        last_layer: bool = False,
        subnetwork_indices: torch.LongTensor | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        lora_modules: str | Sequence[str] | re.Pattern | None = None,
        modules_to_save: bool | None = None,
        kfac_approx: KFACApprox | str = KFACApprox.EXPAND,
        mask_key: str | None = "attention_mask",
        lowrank_threshold: int | None = LowRankOptions.threshold,
        lowrank_rank: int = LowRankOptions.rank,
        lowrank_residual: LowRankResidual | str = LowRankOptions.residual,
    ) -> None:
        if last_layer or subnetwork_indices is not None:
            raise ValueError(
                "LoRA backends select the LoRA weights themselves: `last_layer` and "
                "`subnetwork_indices` are not supported. For last-layer LoRA Laplace "
                "pass lora_modules=['lm_head']."
            )
        CurvatureInterface.__init__(
            self, model, likelihood, False, None, dict_key_x, dict_key_y
        )
        self.kfac_approx = parse_kfac_approx(kfac_approx)
        self.mask_key = mask_key
        self.lora_modules = lora_modules
        self.modules_to_save = modules_to_save
        self.lora_weights: list[LoRAWeight] = find_lora_weights(
            model, lora_modules, modules_to_save
        )
        self.params = [w.param for w in self.lora_weights]
        self.params_dict = {w.name: w.param for w in self.lora_weights}
        self._names = [w.name for w in self.lora_weights]
        self.compute_dtype = compute_dtype(self.params[0].dtype)
        self.lowrank = LowRankOptions(lowrank_threshold, lowrank_rank, lowrank_residual)
        ranks = [min(w.param.shape) for w in self.lora_weights if not w.is_head]
        self.lowrank.check_lora_rank(max(ranks, default=0))

    # ------------------------------------------------------------------ helpers
    def _recorder(self, x: Batch, keep_outputs: bool = False) -> ActivationRecorder:
        return ActivationRecorder(
            [w.module for w in self.lora_weights],
            [w.name for w in self.lora_weights],
            keep_outputs=keep_outputs,
            batch_tokens=self._batch_tokens(x),
            biases=[w.is_bias for w in self.lora_weights],
        )

    def _batch_tokens(self, x: Batch) -> tuple[int, int | None] | None:
        """`(batch, tokens)` of a batch, from its mask or inputs.

        `tokens` is None where the inputs have no token axis (feature
        vectors); the result is None for inputs of an unknown kind.

        Returns
        -------
        tuple[int, int or None] or None
        """
        ref = x
        if isinstance(x, MutableMapping):
            mask = x.get(self.mask_key) if self.mask_key is not None else None
            if mask is not None:  # (batch, tokens), whatever its dtype
                mask = torch.as_tensor(mask)
                return (mask.shape[0], mask.shape[1]) if mask.ndim == 2 else None
            ref = x.get(self.dict_key_x)
        if not isinstance(ref, torch.Tensor) or ref.ndim == 0:
            return None
        tokens = ref.ndim == 3 or (ref.ndim == 2 and not ref.is_floating_point())
        return ref.shape[0], ref.shape[1] if tokens else None

    def _forward(
        self, x: Batch, features: bool = False, tokens: bool = False
    ) -> torch.Tensor:
        # (batch, outputs); with `tokens` also (batch, tokens, vocab) LM logits
        f = self.model.forward_features(x) if features else self.model(x)
        ok = isinstance(f, torch.Tensor) and (f.ndim == 2 or (tokens and f.ndim == 3))
        if not ok:
            shape = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
            raise ValueError(
                f"The model must return a (batch, outputs) tensor, got {shape}. "
                "Wrap a causal LM so that it returns the logits of the answer tokens "
                "at the last position (see laplace_lora_backend.llm), or a "
                "sequence-classification model's `.logits`. A causal LM's (batch, "
                "tokens, vocab) logits: fit with the EF or MC Fisher, tune the prior "
                "with optimize_prior_precision(trust_region=None) (marglik), predict "
                "with la.next_token_predictive / la.generate."
            )
        return f

    def _checked_inputs(
        self, rec: ActivationRecorder, f: torch.Tensor
    ) -> list[torch.Tensor]:
        """Recorded layer inputs; raise if one is missing or not finite.

        Non-finite outputs with finite LoRA inputs are reported too.

        Returns
        -------
        list[torch.Tensor]
            One input tensor per LoRA weight.

        """
        inputs = rec.checked_inputs(f.shape[0])
        check_finite(inputs, self._names, "inputs")
        if not bool(torch.isfinite(f).all()):
            check_finite([f], ["model outputs"], "values")
        return inputs

    def _loss(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Summed loss in `compute_dtype`, after checking the targets.

        Returns
        -------
        torch.Tensor
            Scalar.
        """
        check_targets(y, f.shape[-1], self.likelihood)
        check_index_rank(f, y)
        if f.ndim == 3:  # next-token logits: summed over positions with a target
            return token_cross_entropy(f.to(self.compute_dtype), y)
        if y.is_floating_point():  # regression / soft targets in the same dtype
            y = y.to(self.compute_dtype)
        return self.lossfunc(f.to(self.compute_dtype), y)

    # --------------------------------------------------------- curvature type
    def _output_gradient_passes(
        self, f: torch.Tensor, y: torch.Tensor, mc_samples: int | None = None
    ):
        """Yield `(scalar, weight)` pairs for the output-gradient factor.

        Backpropagating each `scalar` gives output gradients whose outer
        products, times `weight`, sum to this curvature's output factor.
        `mc_samples` overrides the number of sampled labels of a stochastic
        curvature (laplace-torch passes ``asdl_fisher_kwargs`` through).
        """
        raise NotImplementedError


class LoRAGGN(LoRAInterface, GGNInterface):
    """Generalized Gauss-Newton (or MC Fisher) of the LoRA weights.

    Exact GGN: one backward pass per output column of the loss Hessian's
    square root. ``stochastic=True``: Monte-Carlo Fisher with `num_samples`
    labels drawn from the model's predictive (global torch RNG).

    Parameters
    ----------
    model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y
        See `LoRAInterface`.
    stochastic : bool, default=False
    num_samples : int, default=1
    **lora_options
        `lora_modules`, `modules_to_save`, `kfac_approx`, `mask_key`,
        `lowrank_*`: see
        `LoRAInterface`.
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: Likelihood | str,
        last_layer: bool = False,
        subnetwork_indices: torch.LongTensor | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        stochastic: bool = False,
        num_samples: int = 1,
        **lora_options: Any,
    ) -> None:
        if int(num_samples) < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
        self.stochastic = bool(stochastic)
        self.num_samples = int(num_samples)
        LoRAInterface.__init__(
            self,
            model,
            likelihood,
            last_layer,
            subnetwork_indices,
            dict_key_x,
            dict_key_y,
            **lora_options,
        )

    def _output_gradient_passes(
        self, f: torch.Tensor, y: torch.Tensor, mc_samples: int | None = None
    ):
        if self.stochastic:
            n = self.num_samples if mc_samples is None else int(mc_samples)
            if n < 1:
                raise ValueError(f"mc_samples must be >= 1, got {mc_samples}.")
            for _ in range(n):
                with torch.no_grad():
                    if self.likelihood == Likelihood.REGRESSION:
                        # N(y | f, 1/2) is the distribution of MSELoss(sum)
                        y_s = f + math.sqrt(0.5) * torch.randn_like(f)
                    elif f.ndim == 3:  # one label per position with a target
                        y_s = sample_token_labels(f, y)
                    else:
                        y_s = torch.multinomial(f.softmax(-1), 1).squeeze(-1)
                yield self._loss(f, y_s), 1.0 / n
            return
        if f.ndim == 3:
            raise ValueError(EXACT_GGN_OF_TOKENS)
        with torch.no_grad():
            sqrt_h = self._loss_hessian_sqrt(f)  # (batch, C, C)
        for c in range(f.shape[1]):
            yield (f * sqrt_h[:, :, c]).sum(), 1.0

    def diag(
        self, x: Batch, y: torch.Tensor, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Diagonal GGN (laplace-torch's `GGNInterface.diag`).

        With ``stochastic=True`` the MC Fisher diagonal comes from per-example
        gradients at sampled targets: one backward pass per sample instead of
        one per output, and no `(batch, outputs, P)` Jacobian.

        Returns
        -------
        loss : torch.Tensor
            `factor * summed loss`.
        H : torch.Tensor
            `(P,)`.
        """
        if not self.stochastic:
            return super().diag(x, y, **kwargs)
        with torch.enable_grad(), grad_enabled(self.lora_weights):
            with self._recorder(x, keep_outputs=True) as rec:
                f = self._forward(x, tokens=True)
                inputs = self._checked_inputs(rec, f)
                loss = self._loss(f, y)
                passes = list(
                    self._output_gradient_passes(f, y, kwargs.get("mc_samples"))
                )
                H = f.new_zeros(sum(p.numel() for p in self.params))
                H = H.to(self.compute_dtype)
                outputs = list(rec.outputs)
                for k, (scalar, weight) in enumerate(passes):
                    G = self._per_example_gradients(
                        scalar, outputs, inputs, retain_graph=k < len(passes) - 1
                    )
                    H += weight * G.square().sum(0)
        return self.factor * loss.detach(), self.factor * H

    def _loss_hessian_sqrt(self, f: torch.Tensor) -> torch.Tensor:
        """Square root `S` of the loss Hessian w.r.t. `f`, `(batch, C, C)`.

        ``S S^T`` is the Hessian of the summed loss for each example.

        Returns
        -------
        torch.Tensor
            `(batch, C, C)` in `compute_dtype`.
        """
        B, C = f.shape
        if self.likelihood == Likelihood.REGRESSION:
            eye = torch.eye(C, dtype=self.compute_dtype, device=f.device)
            return math.sqrt(2.0) * eye.expand(B, C, C)
        p = f.to(self.compute_dtype).softmax(-1)
        s = p.sqrt()
        return torch.diag_embed(s) - p[:, :, None] * s[:, None, :]


class LoRAEF(LoRAInterface, EFInterface):
    """Empirical Fisher of the LoRA weights (one backward pass per batch)."""

    def _output_gradient_passes(
        self, f: torch.Tensor, y: torch.Tensor, mc_samples: int | None = None
    ):
        yield self._loss(f, y), 1.0


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of curvature and Jacobians for LoRA weights of `dtype`.

    float32 for float16 / bfloat16 (their sums of squares overflow or lose
    every digit); the weights' own dtype otherwise.

    Returns
    -------
    torch.dtype
    """
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
