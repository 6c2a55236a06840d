"""The ``"lora"`` prior structure and marglik over groups of LoRA tensors."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from laplace_lora_backend.curvature.discovery import LoRAWeight

__all__ = ["LORA_PRIOR", "lora_prior_groups", "marglik_groups"]

# prior_structure of the LoRA classes (see `lora_prior_groups`)
LORA_PRIOR = "lora"


def lora_prior_groups(
    weights: Sequence[LoRAWeight], init: bool | str | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``"lora"`` prior structure: which tensors are tuned, which fixed.

    `lora_A` is drawn at random when the adapter is created and, by the
    `A -> c A`, `B -> B / c` symmetry of ``B A``, its scale is not set by the
    data: its prior is the distribution PEFT drew it from, variance
    ``1 / (3 in_features)`` for the default Kaiming-uniform initialisation
    (``init_lora_weights=True``) and ``1 / r^2`` for ``"gaussian"``. `lora_B`
    (zero at initialisation, all of what fine-tuning learns) gets one prior
    precision tuned by marglik. With a data-dependent initialisation (PiSSA,
    ...) `lora_A` gets its own tuned precision. Trainable heads
    (``modules_to_save``) share one more tuned precision.

    Returns
    -------
    groups : torch.Tensor
        `(n_tensors,)` long: the tuned precision each tensor shares.
    fixed : torch.Tensor
        `(n_tensors,)`: the fixed precision, NaN where tuned.
    """
    init = True if init is None else init
    groups, fixed = [], []
    for w in weights:
        precision = float("nan")
        if w.kind == "A" and init is True:
            precision = 3.0 * w.in_features
        elif w.kind == "A" and str(init).lower() == "gaussian":
            precision = float(w.out_features) ** 2
        groups.append({"B": 0, "A": 1}.get(w.kind, 2))
        fixed.append(precision)
    return torch.tensor(groups), torch.tensor(fixed, dtype=torch.float64)


def marglik_groups(
    la: Any,
    groups: torch.Tensor,
    fixed: torch.Tensor | None = None,
    n_steps: int = 100,
    lr: float = 0.1,
    init: float = 1.0,
) -> torch.Tensor:
    """Per-tensor prior precision maximising the marginal likelihood.

    Tensors share one tuned precision per value of `groups`; where `fixed` is
    not NaN the precision is that value. Adam on the log precisions
    (laplace-torch's marglik: `n_steps`, `lr`).

    Returns
    -------
    torch.Tensor
        `(n_tensors,)` prior precision (also set on `la`).
    """
    fixed = torch.full(groups.shape, float("nan")) if fixed is None else fixed
    fixed = fixed.to(la._device, torch.float64)
    groups = groups.to(la._device)
    log_p = torch.full(
        (int(groups.max()) + 1,), math.log(init), dtype=torch.float64, device=la._device
    )
    log_p.requires_grad_(True)
    opt = torch.optim.Adam([log_p], lr=lr)

    def prior() -> torch.Tensor:
        p = torch.where(fixed.isnan(), log_p.exp()[groups], fixed)
        return p.to(la._dtype)

    for _ in range(n_steps):
        opt.zero_grad()
        (-la.log_marginal_likelihood(prior_precision=prior())).backward()
        opt.step()
    la.prior_precision = prior().detach()
    return la.prior_precision
