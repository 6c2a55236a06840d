"""Baselines of the demo: temperature scaling and MC dropout."""

from __future__ import annotations

import torch

__all__ = ["fit_temperature", "mc_dropout_probs"]


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Temperature minimising validation NLL (LBFGS on log T).

    Returns
    -------
    float
        The temperature `T` (divide the logits by it).
    """
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200)
    logits = logits.double()

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    return log_t.detach().exp().item()


@torch.no_grad()
def mc_dropout_probs(model, batches, n_samples: int) -> torch.Tensor:
    """Average softmax with the LoRA dropout layers active.

    Returns
    -------
    torch.Tensor
        `(n, C)` probabilities, the mean over `n_samples` passes per batch.
    """
    drops = [m for n, m in model.named_modules() if "lora_dropout" in n]
    for m in drops:
        m.train()
    try:
        return torch.cat(
            [
                torch.stack([model(b).softmax(-1) for _ in range(n_samples)]).mean(0)
                for b in batches
            ]
        )
    finally:
        for m in drops:
            m.eval()
