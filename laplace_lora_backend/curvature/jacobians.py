"""Jacobians and per-example gradients of the LoRA weights, from module hooks.

`LoRAJacobians` is a mixin of `LoRAInterface`. One forward pass records each
LoRA linear's input `a` and output; vector-Jacobian products are then taken
w.r.t. the LoRA layer outputs only, and the per-example weight Jacobian of
example `b` is formed as ``sum_t g[b, t] a[b, t]^T``: no per-parameter
autograd machinery, and a cost that grows linearly with the batch.
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from typing import Any

import torch

from laplace_lora_backend.curvature.checks import check_finite
from laplace_lora_backend.curvature.discovery import grad_enabled
from laplace_lora_backend.curvature.tokens import per_example_view

__all__ = ["Batch", "LoRAJacobians"]

Batch = torch.Tensor | MutableMapping[str, Any]


class LoRAJacobians:
    """Jacobians and per-example gradients: a mixin of `LoRAInterface`.

    Uses the host's `lora_weights`, `compute_dtype` and `_names`, and its
    helpers `_recorder`, `_forward`, `_checked_inputs` and `_loss`.

    Attributes
    ----------
    jacobian_chunk_size : int or None
        Outputs per batched vector-Jacobian product in `jacobians`; `None`
        sizes the chunks so that about `_JACOBIAN_BUDGET` floats of output
        gradients are held at once.
    """

    # floats of output-gradients held at once by `jacobians` (~256 MiB fp32)
    _JACOBIAN_BUDGET = 2**26
    jacobian_chunk_size: int | None = None

    def jacobians(
        self, x: Batch, enable_backprop: bool = False, features: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Jacobians of the outputs w.r.t. the LoRA weights.

        One forward pass; then vector-Jacobian products for all outputs at once
        (`torch.autograd.grad` with ``is_grads_batched=True``, in chunks of
        outputs that bound memory; one backward pass per output where an
        operation has no batching rule). The VJPs are taken w.r.t. the LoRA
        layer outputs, and per-example weight Jacobians are formed from them
        and the layer inputs, so the cost grows linearly with the batch.

        Parameters
        ----------
        x : torch.Tensor or MutableMapping
            Batch on the model's device.
        enable_backprop : bool, default=False
            Not supported by this backend.
        features : bool, default=False
            Differentiate ``model.forward_features(x)`` instead of the outputs
            (models whose outputs are a fixed linear map of features, see
            `AnswerTokenClassifier.linear_head`).

        Returns
        -------
        Js : torch.Tensor
            `(batch, outputs, P)`.
        f : torch.Tensor
            `(batch, outputs)`.

        Raises
        ------
        ValueError
            If `enable_backprop` is set, or the model does not return a
            `(batch, outputs)` tensor.
        """
        if enable_backprop:
            raise ValueError(
                "LoRA backends do not support enable_backprop=True; use laplace's "
                "CurvlinopsGGN backend for differentiable predictives."
            )
        with torch.enable_grad(), grad_enabled(self.lora_weights):
            with self._recorder(x, keep_outputs=True) as rec:
                f = self._forward(x, features=features)
                inputs = self._checked_inputs(rec, f)
                outputs = list(rec.outputs)
                B, C = f.shape
                chunk = self._jacobian_chunk(outputs)
                Js = []
                for start in range(0, C, chunk):
                    classes = range(start, min(start + chunk, C))
                    V = f.new_zeros(len(classes), B, C)
                    for k, c in enumerate(classes):
                        V[k, :, c] = 1.0
                    grads = self._batched_vjp(f, outputs, V, last=start + chunk >= C)
                    self._check_output_grads(grads)
                    Js.append(self._jacobian_block(inputs, grads, len(classes)))
        return torch.cat(Js, dim=1).detach(), f.detach().to(self.compute_dtype)

    def _jacobian_chunk(self, outputs: list[torch.Tensor]) -> int:
        """Outputs per batched VJP: `jacobian_chunk_size`, or from the budget.

        Returns
        -------
        int
            At least 1.
        """
        per_class = sum(o.numel() for o in outputs)  # floats per VJP
        return self.jacobian_chunk_size or max(
            1, int(self._JACOBIAN_BUDGET // max(per_class, 1))
        )

    def _batched_vjp(
        self,
        f: torch.Tensor,
        outputs: list[torch.Tensor],
        V: torch.Tensor,
        last: bool,
    ) -> list[torch.Tensor | None]:
        """Gradients of ``sum(f * V[k])`` w.r.t. each LoRA output, stacked over k.

        Returns
        -------
        list[torch.Tensor or None]
            One `(k, batch, *shared, out)` tensor per module (None if unused).
        """
        try:
            return list(
                torch.autograd.grad(
                    f,
                    outputs,
                    grad_outputs=V,
                    retain_graph=not last,
                    is_grads_batched=True,
                    allow_unused=True,
                )
            )
        except RuntimeError:  # an op without a vmap rule: loop over the rows
            per_row = [
                torch.autograd.grad(
                    f, outputs, grad_outputs=v, retain_graph=True, allow_unused=True
                )
                for v in V
            ]
            return [
                None if g[0] is None else torch.stack(g)
                for g in zip(*per_row, strict=True)
            ]

    def _jacobian_block(
        self, inputs: list[torch.Tensor], grads: list[torch.Tensor | None], k: int
    ) -> torch.Tensor:
        """Per-example weight Jacobians `(batch, k, P)` from `k` output VJPs.

        `grads[i]` is `(k, batch, *shared, out)` (or None if unused); the
        weight gradient of example `b` is ``sum_t g[b, t] a[b, t]^T``.

        Returns
        -------
        torch.Tensor
            `(batch, k, P)` in `compute_dtype` (zeros for unused weights).
        """
        B = inputs[0].shape[0]
        out = []
        for w, a, g in zip(self.lora_weights, inputs, grads, strict=True):
            if g is None:
                zeros = a.new_zeros(B, k, w.param.numel(), dtype=self.compute_dtype)
                out.append(zeros)
                continue
            a3 = per_example_view(a).to(self.compute_dtype)
            g4 = g.reshape(k, B, -1, g.shape[-1]).to(self.compute_dtype)
            out.append(torch.einsum("kbto,bti->bkoi", g4, a3).flatten(2))
        return torch.cat(out, dim=2)

    def gradients(self, x: Batch, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example gradients of the summed loss w.r.t. the LoRA weights.

        Parameters
        ----------
        x : torch.Tensor or MutableMapping
        y : torch.Tensor

        Returns
        -------
        Gs : torch.Tensor
            `(batch, P)`.
        loss : torch.Tensor
            Summed loss (without `factor`).
        """
        with torch.enable_grad(), grad_enabled(self.lora_weights):
            with self._recorder(x, keep_outputs=True) as rec:
                f = self._forward(x, tokens=True)
                inputs = self._checked_inputs(rec, f)
                loss = self._loss(f, y)
                Gs = self._per_example_gradients(loss, list(rec.outputs), inputs)
        return Gs.detach(), loss.detach()

    def _check_output_grads(self, grads: Sequence[torch.Tensor | None]) -> None:
        """Raise on NaN / Inf, naming the module where they appear first.

        That is the last module of the forward pass with bad gradients.
        """
        check_finite(grads[::-1], self._names[::-1], "output gradients")

    def _per_example_gradients(
        self,
        scalar: torch.Tensor,
        outputs: list[torch.Tensor],
        inputs: list[torch.Tensor],
        retain_graph: bool = False,
    ) -> torch.Tensor:
        """Per-example gradients `(batch, P)` of `scalar`, a sum over examples.

        One backward pass to the LoRA layer outputs; the weight gradients are
        formed per example from those and the layer `inputs`.

        Returns
        -------
        torch.Tensor
            `(batch, P)`.
        """
        grads = torch.autograd.grad(
            scalar, outputs, retain_graph=retain_graph, allow_unused=True
        )
        self._check_output_grads(grads)
        grads = [None if g is None else g.unsqueeze(0) for g in grads]
        return self._jacobian_block(inputs, grads, 1).squeeze(1)
