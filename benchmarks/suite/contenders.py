"""How each contender's Laplace object is built on a workload's model.

Ours: ``Laplace(model, ..., subset_of_weights="lora", ...)`` (this package).
laplace-torch: its own `KronLaplace` / `DiagLaplace` with
``subset_of_weights="all"`` on the frozen-base PEFT model, i.e. on exactly the
LoRA weights, with each of its curvature backends.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

import laplace_lora_backend  # noqa: F401  (registers "lora")

__all__ = ["Contender", "CONTENDERS", "REFERENCE", "contender"]


@dataclass(frozen=True)
class Contender:
    """A named way to build a Laplace object.

    Attributes
    ----------
    name : str
    structure : {'kron', 'diag'}
    build : callable
        ``build(model)`` returns an unfitted Laplace object.
    ours : bool
    """

    name: str
    structure: str
    build: Callable[[nn.Module], Any]
    ours: bool


def _ours(structure: str, **kwargs: Any) -> Callable[[nn.Module], Any]:
    def build(model: nn.Module) -> Any:
        from laplace import Laplace

        # laplace-torch's probit (center_logits=False): predictives comparable
        return Laplace(
            model,
            "classification",
            subset_of_weights="lora",
            hessian_structure=structure,
            center_logits=False,
            **kwargs,
        )

    return build


def _ours_backend(
    backend: str, backend_kwargs: dict | None = None, **kwargs: Any
) -> Callable[[nn.Module], Any]:
    def build(model: nn.Module) -> Any:

        return _ours(
            "kron",
            backend=getattr(laplace_lora_backend, backend),
            backend_kwargs=backend_kwargs,
            **kwargs,
        )(model)

    return build


def _upstream(structure: str, backend: str) -> Callable[[nn.Module], Any]:
    def build(model: nn.Module) -> Any:
        import laplace
        import laplace.curvature

        cls = {"kron": laplace.KronLaplace, "diag": laplace.DiagLaplace}[structure]
        return cls(model, "classification", backend=getattr(laplace.curvature, backend))

    return build


CONTENDERS: list[Contender] = [
    Contender("ours kron dense", "kron", _ours("kron", lowrank_threshold=None), True),
    # every side >= 64 low-rank (the width sweep's low-rank line at any width)
    Contender("ours kron low-rank", "kron", _ours("kron", lowrank_threshold=64), True),
    # the library's default: low-rank from DEFAULT_LOWRANK_THRESHOLD (1024) on
    Contender("ours kron default", "kron", _ours("kron"), True),
    Contender(
        "ours kron EF", "kron", _ours_backend("LoRAEF", lowrank_threshold=None), True
    ),
    Contender(
        "ours kron MC", "kron", _ours_backend("LoRAGGN", {"stochastic": True}), True
    ),
    Contender("ours diag", "diag", _ours("diag"), True),
]
for _structure in ("kron", "diag"):
    for _backend in (
        "CurvlinopsGGN",
        "CurvlinopsEF",
        "AsdlGGN",
        "AsdlEF",
        "BackPackGGN",
        "BackPackEF",
    ):
        CONTENDERS.append(
            Contender(
                f"laplace-torch {_structure} {_backend}",
                _structure,
                _upstream(_structure, _backend),
                False,
            )
        )

# contender -> ours computing the same quantity (agreement column)
REFERENCE: dict[str, str] = {
    "ours kron low-rank": "ours kron dense",
    "ours kron default": "ours kron dense",
    "laplace-torch kron CurvlinopsGGN": "ours kron dense",
    "laplace-torch kron AsdlGGN": "ours kron dense",
    "laplace-torch kron BackPackGGN": "ours kron dense",
    "laplace-torch kron CurvlinopsEF": "ours kron EF",
    "laplace-torch kron AsdlEF": "ours kron EF",
    "laplace-torch kron BackPackEF": "ours kron EF",
    "laplace-torch diag CurvlinopsGGN": "ours diag",
    "laplace-torch diag AsdlGGN": "ours diag",
    "laplace-torch diag BackPackGGN": "ours diag",
}


def contender(name: str) -> Contender:
    """The contender called `name`.

    Returns
    -------
    Contender

    Raises
    ------
    ValueError
        If no contender is called `name`.
    """
    for c in CONTENDERS:
        if c.name == name:
            return c
    raise ValueError(
        f"Unknown contender {name!r}; choose from {[c.name for c in CONTENDERS]}."
    )
