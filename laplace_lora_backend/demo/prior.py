"""The demo's prior modes, through the library's `optimize_prior_precision`."""

from __future__ import annotations

from typing import Any

from laplace_lora_backend.demo.config import PRIOR_MODES

__all__ = ["tune_prior"]


def tune_prior(la, val, mode: str = "auto") -> dict[str, Any]:
    """Choose the prior precision with the library's API; the choice (JSON).

    Parameters
    ----------
    la : fitted LoRA Laplace object
    val : list[tuple[JacobianBatch, torch.Tensor]]
        Validation Jacobians (`jacobian_batches`), shared by the Laplace
        objects over the same LoRA weights.
    mode : {'auto', 'marglik', 'validation'}
        ``'marglik'``: ``optimize_prior_precision()`` (no validation data).
        ``'validation'``: ``method="gridsearch"`` on validation NLL.
        ``'auto'`` (default): ``method="auto"``: marglik, checked against MAP
        on validation NLL (see `LoRALaplace.optimize_prior_precision`).

    Returns
    -------
    dict[str, Any]
        JSON-serialisable: ``method`` and ``prior_precision``, or the
        ``prior_choice`` of ``method="auto"``.

    Raises
    ------
    ValueError
        If `mode` is not one of `PRIOR_MODES`.
    """
    if mode not in PRIOR_MODES:
        raise ValueError(f"Unknown prior mode {mode!r}; choose one of {PRIOR_MODES}.")
    if mode == "marglik":
        la.optimize_prior_precision()
        return {"method": "marglik", "prior_precision": la.prior_precision.tolist()}
    if mode == "validation":
        la.optimize_prior_precision(method="gridsearch", val_loader=val)
        return {"method": "gridsearch", "prior_precision": la.prior_precision.tolist()}
    la.optimize_prior_precision(method="auto", val_loader=val)
    return la.prior_choice.to_dict()
