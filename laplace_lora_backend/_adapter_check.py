"""Compare a saved posterior's LoRA weights with a model's: first mismatch.

A posterior applies only to the adapter it was fitted with: same LoRA weight
names, in the same order, with the same shapes. `check_lora_weights` raises an
`AdapterMismatchError` whose message names the first difference (a missing
or extra target module, another LoRA rank, another order) and the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from laplace_lora_backend.errors import AdapterMismatchError

__all__ = ["check_lora_weights"]


def check_lora_weights(
    expected: list[dict[str, Any]],
    found: list[tuple[str, list[int]]],
    directory: Path,
) -> None:
    """Raise `AdapterMismatchError` naming the first differing LoRA weight.

    Raises
    ------
    AdapterMismatchError
        If the names, order or shapes of `found` differ from `expected`.
    """
    exp = [(w["name"], list(w["shape"])) for w in expected]
    message = _first_mismatch(exp, found)
    if message is not None:
        raise AdapterMismatchError(
            f"Cannot load the Laplace posterior in '{directory}' on this model: "
            f"{message} (saved posterior: {len(exp)} LoRA weights, model: "
            f"{len(found)})."
        )


def _first_mismatch(
    expected: list[tuple[str, list[int]]], found: list[tuple[str, list[int]]]
) -> str | None:
    exp_names = {n for n, _ in expected}
    found_names = {n for n, _ in found}
    same_setup = (
        "Load the adapter the posterior was fitted with (same target_modules and r) "
        "into the same base model, wrapped the same way, with the same lora_modules "
        "and modules_to_save"
    )
    for i in range(max(len(expected), len(found))):
        e = expected[i] if i < len(expected) else None
        f = found[i] if i < len(found) else None
        if e == f:
            continue
        if e is not None and e[0] not in found_names:
            return (
                f"LoRA weight '{e[0]}' (shape {tuple(e[1])}) of the saved posterior "
                "is missing from the model: its adapter lacks this target module or "
                f"names it differently. {same_setup}"
            )
        if f is not None and f[0] not in exp_names:
            return (
                f"the model has LoRA weight '{f[0]}' (shape {tuple(f[1])}) that the "
                "saved posterior does not cover. Restrict the posterior's weights "
                f"with lora_modules=..., or {same_setup[0].lower()}{same_setup[1:]}"
            )
        if e is not None and f is not None and e[0] == f[0]:
            hint = _rank_hint(e[0], e[1], f[1])
            return (
                f"LoRA weight '{e[0]}' has shape {tuple(f[1])} in the model but "
                f"{tuple(e[1])} in the saved posterior{hint}. {same_setup}"
            )
        return (
            f"the LoRA weights are in a different order: position {i} is "
            f"'{f[0] if f else None}' in the model but '{e[0] if e else None}' in "
            f"the saved posterior. {same_setup}"
        )
    return None


def _rank_hint(name: str, expected: list[int], found: list[int]) -> str:
    """`` (LoRA rank r=4 saved, r=8 in the model)`` when only `r` differs.

    Returns
    -------
    str
        The hint, or ``""``.
    """
    if len(expected) != 2 or len(found) != 2:
        return ""
    r_dim = 0 if ".lora_A." in name else 1 if ".lora_B." in name else None
    if r_dim is None or expected[1 - r_dim] != found[1 - r_dim]:
        return ""
    return f" (LoRA rank r={expected[r_dim]} saved, r={found[r_dim]} in the model)"
