"""MAP fine-tuning of the LoRA weights: AdamW with weight decay."""

from __future__ import annotations

from collections.abc import Iterable, MutableMapping
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

__all__ = ["train_map", "predict_logits"]


def train_map(
    model: nn.Module,
    batches: Iterable[MutableMapping[str, Any]],
    steps: int,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    progress: bool = True,
) -> list[float]:
    """Train the trainable (LoRA) weights with AdamW on cross-entropy.

    Parameters
    ----------
    model : nn.Module
        Returns `(batch, C)` logits for a dict batch.
    batches : Iterable of dict batches
        Cycled until `steps` optimisation steps are done.
    steps : int
    lr, weight_decay : float
        AdamW settings (weight decay is the MAP's Gaussian prior).
    progress : bool
        Show a tqdm progress bar.

    Returns
    -------
    losses : list[float]
        Mean training loss of each step.

    Raises
    ------
    ValueError
        If `model` has no parameter that requires grad.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("No trainable parameters: the LoRA weights must require grad.")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    batches = list(batches)
    losses = []
    model.train()
    bar = tqdm(range(steps), desc="MAP fine-tuning", disable=not progress)
    for step in bar:
        batch = batches[step % len(batches)]
        loss = nn.functional.cross_entropy(model(batch), batch["labels"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses


@torch.no_grad()
def predict_logits(
    model: nn.Module, batches: Iterable[MutableMapping[str, Any]]
) -> torch.Tensor:
    """Concatenated logits `(n, C)` of `model` over the batches.

    Returns
    -------
    torch.Tensor
        `(n, C)`, computed without gradients.
    """
    return torch.cat([model(b) for b in batches])
