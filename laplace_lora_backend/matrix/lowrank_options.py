"""Which Kronecker factors are kept low-rank, and how: `LowRankOptions`.

The options of `LoRAKronLaplace` / the LoRA backends (`lowrank_threshold`,
`lowrank_rank`, `lowrank_residual`), validated once, and the cost-aware
default threshold.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

__all__ = [
    "DEFAULT_LOWRANK_THRESHOLD",
    "LowRankOptions",
    "LowRankResidual",
    "parse_residual",
]

#: `LoRAKronLaplace`'s default: a factor of side d is low-rank iff d >= 1024, the
#: measured width from which a low-rank fit is faster than a dense one (2 CPU
#: cores; `benchmarks/bench_lowrank_crossover.py`); below, dense is exact and <= 4 MiB.
DEFAULT_LOWRANK_THRESHOLD = 1024


class LowRankResidual(str, Enum):
    """What to do with the spectrum a rank-k truncation discards."""

    TRACE = "trace"
    NONE = "none"


def parse_residual(value: LowRankResidual | str) -> LowRankResidual:
    """Validate a `lowrank_residual` option.

    Returns
    -------
    LowRankResidual

    Raises
    ------
    ValueError
        If `value` is not ``"trace"`` or ``"none"``.
    """
    try:
        return LowRankResidual(value)
    except ValueError:
        raise ValueError(
            f"Unknown lowrank_residual={value!r}. Use 'trace' (keep the discarded "
            "spectrum as an isotropic c*I) or 'none' (drop it)."
        ) from None


@dataclass(frozen=True)
class LowRankOptions:
    """Which Kronecker factors are kept low-rank, and how (validated here).

    Attributes
    ----------
    threshold : int or None, default=None
        Factors whose side is `>= threshold` are streaming low-rank factors;
        None keeps every factor dense.
    rank : int, default=16
        Rank `k` kept for each low-rank factor.
    residual : LowRankResidual, default='trace'
        Keep what truncation discards as ``c I`` (``"trace"``) or drop it.

    Raises
    ------
    ValueError
        A rank below 1, a non-integer threshold or an unknown residual.
    """

    threshold: int | None = None
    rank: int = 16
    residual: LowRankResidual = LowRankResidual.TRACE

    def __post_init__(self) -> None:
        rank, threshold = self.rank, self.threshold
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"lowrank_rank must be an integer >= 1, got {rank!r}.")
        if threshold is not None and (
            isinstance(threshold, bool) or not isinstance(threshold, int)
        ):
            raise ValueError(
                f"lowrank_threshold must be an int or None, got {threshold!r}."
            )
        object.__setattr__(self, "residual", parse_residual(self.residual))

    def is_lowrank(self, dim: int) -> bool:
        """Whether a factor of side `dim` is kept low-rank.

        Returns
        -------
        bool
            True if a `threshold` is set and ``dim >= threshold``.
        """
        return self.threshold is not None and dim >= self.threshold

    def lowrank_sides(self, shape: tuple[int, ...]) -> tuple[bool, ...]:
        """Which factors of a weight of `shape` are kept low-rank.

        A LoRA factor has one small side (its rank). A head `(out, in)` may
        be wide on both: then only the wider side (`out` on a tie) is
        compressed, since a block holds at most one low-rank factor. A bias
        `(out,)` has one dense factor.

        Returns
        -------
        tuple[bool, ...]
            One flag per factor: `(out, in)` or `(out,)`.
        """
        if len(shape) == 1:
            return (False,)
        out, inp = shape
        wide = self.is_lowrank(out), self.is_lowrank(inp)
        if all(wide):
            return (out >= inp, inp > out)
        return wide

    def check_lora_rank(self, r_max: int) -> None:
        """Raise if the threshold would compress a LoRA rank-`r_max` side.

        Raises
        ------
        ValueError
            If ``threshold <= r_max``.
        """
        if self.threshold is not None and self.threshold <= r_max:
            raise ValueError(
                f"lowrank_threshold={self.threshold} would compress the LoRA "
                f"rank-{r_max} factors too; use a threshold above the LoRA rank "
                f"(LoRAKronLaplace's default is {DEFAULT_LOWRANK_THRESHOLD}), or "
                "None for dense factors."
            )
