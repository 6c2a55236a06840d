"""Data-parallel fitting on `torch.distributed`: combine per-rank curvature.

Each rank fits the curvature of its own shard (e.g. through a
`DistributedSampler`); the pieces are then combined so that every rank holds
the posterior a single process would fit on the union of the shards:

- dense Kronecker factors, diagonal and full curvature and the loss are
  all-reduced (sum);
- input factors are re-scaled from each rank's data set size to the total
  number of examples fitted, ``N = sum_r n_r``, before the sum;
- low-rank factors are gathered and merged in rank order with the same
  truncated-SVD rule as streaming accumulation (exact while the data span at
  most `k` directions; the exact trace, and so the residual, is summed).

Before any curvature is exchanged the ranks swap a small description (LoRA
weight names and shapes, a checksum of the weights, errors raised while
fitting), so a rank whose model differs or whose fit failed makes EVERY rank
raise instead of leaving the others waiting in a collective. Prior tuning and
prediction need no communication afterwards: every rank holds the same
posterior.

A `DistributedSampler` with ``drop_last=False`` repeats examples so that
every rank gets as many; those repeats are left out of the fit
(`without_sampler_padding`), so the ranks together fit each example once and
``n_data`` is the data set size.

Works with any backend of `torch.distributed` (gloo on CPU, nccl on GPU); with
no process group, or a group of one, nothing changes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.utils import parameters_to_vector
from torch.utils.data import DistributedSampler

from laplace_lora_backend.errors import DistributedFitError
from laplace_lora_backend.matrix.lowrank import LowRankFactor
from laplace_lora_backend.validation import first_difference, signature

__all__ = [
    "DistributedFitError",
    "RankReport",
    "combine_ranks",
    "active_group",
    "gather_reports",
    "check_reports",
    "reduce_tensor",
    "reduce_factor",
    "without_sampler_padding",
]


@dataclass
class RankReport:
    """What one rank tells the others after its local fit.

    Attributes
    ----------
    rank : int
    signature : list[tuple[str, tuple[int, ...]]]
        LoRA weight names and shapes.
    checksum : tuple[float, float]
        Sum and sum of squares of the LoRA weights (replicas must agree).
    n_seen : int
        Examples fitted on this rank.
    n_declared : int
        ``len(train_loader.dataset)`` on this rank (scales its input factors).
    n_outputs : int or None
        Model outputs (None for an empty shard).
    error : str or None
        ``"TypeName: message"`` if the local fit raised.
    """

    rank: int
    signature: list[tuple[str, tuple[int, ...]]]
    checksum: tuple[float, float]
    n_seen: int
    n_declared: int
    n_outputs: int | None
    error: str | None


def active_group(process_group: Any = None) -> Any:
    """The process group to reduce over, or None for a single process.

    Parameters
    ----------
    process_group : torch.distributed.ProcessGroup, optional
        A sub-group; default the world group when `torch.distributed` is
        initialised.

    Returns
    -------
    torch.distributed.ProcessGroup or None
        None when `torch.distributed` is not initialised or the group has a
        single rank.

    Raises
    ------
    ValueError
        If `process_group` is given but `torch.distributed` is not initialised.
    """
    if not (dist.is_available() and dist.is_initialized()):
        if process_group is not None:
            raise ValueError(
                "process_group is given but torch.distributed is not initialised; "
                "call torch.distributed.init_process_group first (torchrun does)."
            )
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def gather_reports(report: RankReport, group: Any) -> list[RankReport]:
    """All ranks' reports, in rank order, on every rank.

    Returns
    -------
    list[RankReport]
        One per rank of `group`.
    """
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, report, group=group)
    return out


def check_reports(reports: list[RankReport], my_rank: int) -> None:
    """Raise the same `DistributedFitError` on every rank if they disagree.

    Raises
    ------
    DistributedFitError
        A rank's fit failed, the LoRA weights (names, shapes) differ, the
        weights' values differ (unsynchronised replicas), or every shard is
        empty.
    """
    failed = [r for r in reports if r.error is not None]
    if failed:
        first = failed[0]
        where = "this rank" if first.rank == my_rank else f"rank {first.rank}"
        raise DistributedFitError(
            f"The distributed fit failed on {where}: {first.error}. Every rank "
            "stops; fix the input of that rank and fit again on all ranks."
        )
    ref = reports[0]
    for r in reports[1:]:
        if r.signature != ref.signature:
            diff = first_difference(ref.signature, r.signature)
            raise DistributedFitError(
                f"Ranks {ref.rank} and {r.rank} have different LoRA weights "
                f"({diff}). Every rank must hold the same PEFT model and adapter, "
                "with the same lora_modules."
            )
    for r in reports[1:]:
        if any(
            abs(a - b) > 1e-6 * max(abs(a), abs(b), 1e-30)
            for a, b in zip(r.checksum, ref.checksum, strict=True)
        ):
            raise DistributedFitError(
                f"The LoRA weights of ranks {ref.rank} and {r.rank} have the same "
                "shapes but different values: the replicas are not synchronised. "
                "Load the same fine-tuned adapter on every rank before fitting."
            )
    if all(r.n_seen == 0 for r in reports):
        raise DistributedFitError("Every rank's train_loader is empty: nothing to fit.")


def reduce_tensor(t: torch.Tensor, group: Any) -> torch.Tensor:
    """Sum of `t` over the ranks (a new tensor; `t` is untouched).

    Returns
    -------
    torch.Tensor
        Detached, same shape as `t`.
    """
    out = t.detach().clone().contiguous()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def reduce_factor(F: Any, scale: float, group: Any) -> Any:
    """Sum over ranks of ``scale * F`` for a dense or low-rank factor.

    Low-rank factors are gathered and merged in rank order, so every rank
    gets the same result.

    Returns
    -------
    torch.Tensor or LowRankFactor
        The same kind as `F`.
    """
    if isinstance(F, LowRankFactor):
        mine = (F * scale).to_state()
        state = {k: v.cpu() if torch.is_tensor(v) else v for k, v in mine.items()}
        states: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(states, state, group=group)
        merged = None
        for s in states:
            s = {k: v.to(F.device) if torch.is_tensor(v) else v for k, v in s.items()}
            part = LowRankFactor.from_state(s)
            merged = part if merged is None else merged.merge(part)
        return merged
    return reduce_tensor(F * scale, group)


def combine_ranks(
    la: Any, group: Any, loader: Any, empty: bool, error: Exception | None
) -> None:
    """Sum the ranks' curvature so that every rank holds the union's posterior.

    Parameters
    ----------
    la : LoRALaplace
        This rank's object after its local fit (or its failed / empty fit).
    group : torch.distributed.ProcessGroup
    loader : Iterable
        This rank's training loader (``len(loader.dataset)`` is the data set
        size the input factors were divided by).
    empty : bool
        This rank's shard was empty.
    error : Exception or None
        The error this rank's fit raised; every rank then raises.

    Raises
    ------
    DistributedFitError
        On every rank, if one rank failed or the ranks' LoRA weights differ.
    """
    rank = dist.get_rank(group)
    with torch.no_grad():
        theta = parameters_to_vector(la.params).double()
    try:
        n_declared = len(loader.dataset)
    except (AttributeError, TypeError):
        n_declared = la._n_seen
    report = RankReport(
        rank=rank,
        signature=signature(la.lora_weights),
        checksum=(float(theta.sum()), float(theta.square().sum())),
        n_seen=0 if empty or error else la._n_seen,
        n_declared=n_declared,
        n_outputs=None if empty or error else la.n_outputs,
        error=None if error is None else f"{type(error).__name__}: {error}",
    )
    reports = gather_reports(report, group)
    try:
        check_reports(reports, rank)
    except DistributedFitError as err:
        raise err from error
    if empty:
        la._init_empty_fit(next(r.n_outputs for r in reports if r.n_outputs))
    n_total = sum(r.n_seen for r in reports)
    la._reduce_curvature(group, n_declared / n_total)
    loss = torch.as_tensor(la.loss, dtype=la._dtype, device=la._device)
    la.loss = reduce_tensor(loss, group)
    la.n_data = n_total


def _sampler_repeats(loader: Any) -> int:
    """Examples `loader`'s `DistributedSampler` repeats on this rank.

    Returns
    -------
    int
        0 without such a sampler or with ``drop_last=True``.
    """
    sampler = getattr(loader, "sampler", None)
    if not isinstance(sampler, DistributedSampler) or sampler.drop_last:
        return 0
    n = len(sampler.dataset)  # type: ignore[arg-type]
    # the padded index list repeats its head; rank r takes positions r, r+R, ...
    return sum(
        1
        for j in range(sampler.rank, sampler.total_size, sampler.num_replicas)
        if j >= n
    )


def _head(data: Any, m: int) -> Any:
    """The first `m` examples of a batch (tensors, dicts, `(x, y)` pairs).

    Returns
    -------
    Any
        The same structure, each tensor cut along its first axis.
    """
    if isinstance(data, torch.Tensor):
        return data[:m] if data.ndim else data
    if isinstance(data, MutableMapping):
        return {k: _head(v, m) for k, v in data.items()}
    if isinstance(data, (tuple, list)):
        return type(data)(_head(v, m) for v in data)
    return data


class _UnpaddedLoader:
    """`loader` stopping after its first `keep` examples (`.dataset` kept)."""

    def __init__(self, loader: Any, keep: int, dict_key_y: str) -> None:
        self.loader, self.keep, self.dict_key_y = loader, keep, dict_key_y
        self.dataset = loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        seen = 0
        for data in self.loader:
            if isinstance(data, MutableMapping):  # no labels: CheckedLoader says so
                y = data.get(self.dict_key_y)
            else:
                y = data[1] if len(data) == 2 else None
            left = self.keep - seen
            if left <= 0:
                return
            if y is None:
                yield data
                continue
            seen += len(y)
            yield data if len(y) <= left else _head(data, left)


def without_sampler_padding(loader: Iterable, dict_key_y: str = "labels") -> Iterable:
    """`loader` without the examples its `DistributedSampler` repeats.

    With ``drop_last=False`` a `DistributedSampler` pads the index list with
    its first indices until it divides evenly among the ranks; the repeats
    come last in a rank's shard. Fitting them would count those examples
    twice (and ``n_data`` one too many per repeat).

    Parameters
    ----------
    loader : Iterable
        This rank's training loader.
    dict_key_y : str, default='labels'
        Label key of dict batches (counts the examples of a batch).

    Returns
    -------
    Iterable
        `loader` itself when nothing is repeated; else a loader that stops
        after this rank's distinct examples.
    """
    repeats = _sampler_repeats(loader)
    if not repeats:
        return loader
    keep = loader.sampler.num_samples - repeats  # type: ignore[attr-defined]
    return _UnpaddedLoader(loader, keep, dict_key_y)
