"""Capture the inputs and output gradients of LoRA linear modules.

A LoRA layer computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling``. For
each `lora_A` / `lora_B` `nn.Linear` (and each linear head in the posterior;
a head's bias is an entry whose input is a constant 1) the recorder keeps the
layer input `a`
(detached) of the last forward pass and hands every gradient `g` that flows
back into the layer output to a callback. From `a` and `g` the backend builds
Kronecker factors, per-example gradients and Jacobians: one forward pass, then
as many backward passes as the curvature type needs, with no per-parameter
autograd machinery (no ASDL, BackPACK or Curvlinops).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import nn

__all__ = ["ActivationRecorder"]

GradCallback = Callable[[int, torch.Tensor], None]


class ActivationRecorder:
    """Context manager recording inputs and output gradients of linear modules.

    Parameters
    ----------
    modules : Sequence[torch.nn.Linear]
        Modules to watch; module `i`'s data is reported under index `i`.
    names : Sequence[str]
        Human-readable names, used in error messages.
    keep_outputs : bool, default=False
        Keep each module's output tensor (in the autograd graph), for
        gradients w.r.t. the outputs, instead of installing tensor hooks.
    batch_tokens : tuple[int, int | None] or None, default=None
        `(batch, tokens)` of the batch about to run (`tokens` None if the
        batch has no token axis). A module whose input rows are the batch's
        tokens flattened, `(batch * tokens, in)` (OPT's `fc1` / `fc2`,
        Qwen2-MoE's shared expert), is recorded as `(batch, tokens, in)` and
        its output gradients as `(batch, tokens, out)`, so that it is treated
        like any other layer (padding masked, one example per sequence).
        Inputs whose rows map to neither raise. None: no checks.
    biases : Sequence[bool], optional
        Entries that stand for a module's bias: their recorded input is a
        constant 1, `(batch, *shared, 1)` (the bias is a weight on it).

    Attributes
    ----------
    inputs : list[torch.Tensor | None]
        Input of module `i` in the last forward pass, `(batch, *shared, in)`.
    outputs : list[torch.Tensor | None]
        Its output as the model computed it, if `keep_outputs`: `(batch,
        *shared, out)`, or `(batch * tokens, out)` for a flattened-token
        module (gradients w.r.t. it reshape to `(batch, tokens, out)` in
        row order).
    on_grad : callable or None
        Called as ``on_grad(i, g)`` with the gradient `g` w.r.t. module `i`'s
        output, `(batch, *shared, out)`, during every backward pass.
    """

    def __init__(
        self,
        modules: Sequence[nn.Linear],
        names: Sequence[str],
        keep_outputs: bool = False,
        batch_tokens: tuple[int, int | None] | None = None,
        biases: Sequence[bool] | None = None,
    ):
        self.modules = list(modules)
        self.names = list(names)
        self.keep_outputs = keep_outputs
        self.batch_tokens = batch_tokens
        self.biases = list(biases) if biases is not None else [False] * len(modules)
        self._flat = [False] * len(self.modules)
        self.inputs: list[torch.Tensor | None] = [None] * len(self.modules)
        self.outputs: list[torch.Tensor | None] = [None] * len(self.modules)
        self.on_grad: GradCallback | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def reset(self) -> None:
        """Forget the inputs (and outputs) of the previous forward pass."""
        self.inputs = [None] * len(self.modules)
        self.outputs = [None] * len(self.modules)

    def __enter__(self) -> ActivationRecorder:
        self.reset()
        for i, module in enumerate(self.modules):
            self._handles.append(module.register_forward_hook(partial(self._fwd, i)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        # Break the cycle output tensor -> tensor hook -> recorder -> output:
        # the garbage collector cannot see through autograd's C++ hooks, so
        # without this every call leaked its whole autograd graph.
        self.on_grad = None
        self.reset()

    def _fwd(self, i: int, module: nn.Module, args: tuple, output: torch.Tensor):
        if self.inputs[i] is not None:
            raise ValueError(
                f"LoRA module '{self.names[i]}' ran twice in one forward pass (shared "
                "or tied module). Each LoRA weight must be applied once per forward; "
                "exclude it with `lora_modules`."
            )
        a = self._per_example(i, args[0].detach())
        self.inputs[i] = a.new_ones(*a.shape[:-1], 1) if self.biases[i] else a
        if self.keep_outputs:  # gradients are taken w.r.t. the outputs directly
            self.outputs[i] = output
        elif output.requires_grad:
            output.register_hook(partial(self._bwd, i))

    def _per_example(self, i: int, a: torch.Tensor) -> torch.Tensor:
        """`a` with the batch first: flattened token rows unflattened.

        Returns
        -------
        torch.Tensor
            `(batch, *shared, in)`.

        Raises
        ------
        ValueError
            If the rows of `a` are neither the batch's examples nor its
            tokens, flattened (e.g. a routed expert that sees some tokens).
        """  # noqa: DOC502 (raised as `self._unmapped(...)`)
        self._flat[i] = False
        if self.batch_tokens is None or a.ndim == 0:
            return a
        B, T = self.batch_tokens
        if a.shape[0] == B:
            return a
        if a.ndim == 2 and T is not None and a.shape[0] == B * T:
            self._flat[i] = True
            return a.view(B, T, a.shape[-1])
        raise self._unmapped(i, a, B, T)

    def _unmapped(self, i: int, a: torch.Tensor, B: int, T: int | None) -> ValueError:
        """The error for module `i`, whose input rows are not `B` examples.

        Returns
        -------
        ValueError
            Naming the module, the shapes and the fix.
        """
        tokens = (
            " (no attention mask to map flattened token rows back)"
            if T is None
            else f" of {T} tokens ({B * T} token rows)"
        )
        return ValueError(
            f"LoRA module '{self.names[i]}' received an input of shape "
            f"{tuple(a.shape)} for a batch of {B} examples{tokens}: its rows "
            "cannot be mapped back to examples (e.g. a routed mixture-of-experts "
            "layer that sees a subset of the tokens). Leave it out of the "
            "posterior with Laplace(..., lora_modules=[...]) or of the adapter's "
            "target_modules."
        )

    def example_grad(self, i: int, grad: torch.Tensor) -> torch.Tensor:
        """A gradient w.r.t. module `i`'s output, batch first.

        Parameters
        ----------
        i : int
        grad : torch.Tensor
            `(*lead, rows, out)`: the gradient w.r.t. the output the model
            computed, with any leading axes (e.g. batched VJPs).

        Returns
        -------
        torch.Tensor
            `(*lead, batch, tokens, out)` for a flattened-token module;
            `grad` otherwise.
        """
        if not self._flat[i]:
            return grad
        B, T = self.batch_tokens  # type: ignore[misc]
        return grad.reshape(*grad.shape[:-2], B, T, grad.shape[-1])

    def _bwd(self, i: int, grad: torch.Tensor) -> None:
        if self.on_grad is not None:
            self.on_grad(i, self.example_grad(i, grad.detach()))

    def checked_inputs(self, batch_size: int) -> list[torch.Tensor]:
        """Inputs of every module, raising if one did not run or is not per example.

        Parameters
        ----------
        batch_size : int
            Examples in the batch (the model output's first axis): every input
            must have them first (checked here when `batch_tokens` was not
            known while recording).

        Returns
        -------
        inputs : list[torch.Tensor]

        Raises
        ------
        ValueError
            If a watched module was not called in the last forward pass, or
            its input rows are not the batch's examples.
        """
        missing = [n for n, a in zip(self.names, self.inputs, strict=True) if a is None]
        if missing:
            raise ValueError(
                f"LoRA modules {missing} were not called in the forward pass, so the "
                "model output does not depend on them. Exclude them with "
                "`lora_modules`, or check that the adapter is active."
            )
        for i, a in enumerate(self.inputs):
            if a.ndim == 0 or a.shape[0] != batch_size:  # type: ignore[union-attr]
                raise self._unmapped(i, a, batch_size, None)  # type: ignore[arg-type]
        return list(self.inputs)  # type: ignore[arg-type]
