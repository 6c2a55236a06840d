"""Timing and memory measurements shared by the benchmark sections."""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "run_meta",
    "sync",
    "timed",
    "Timing",
    "timed_ratio",
    "rss_bytes",
    "peak_rss_bytes",
    "PeakMemory",
    "error_message",
    "run_limited",
]


def run_meta(
    device: str,
    threads: int,
    repeats: int,
    limit_s: float,
    mem_gib: float,
    command: str,
) -> dict[str, Any]:
    """What a benchmark's result records about the machine and its settings.

    Returns
    -------
    dict
        ``machine`` (with the GPU's name on CUDA), ``torch``, ``device``,
        ``threads``, ``repeats``, the per-cell limits and ``command``.
    """
    gpu = (
        f", {torch.cuda.get_device_name()}"
        if torch.device(device).type == "cuda"
        else ""
    )
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores{gpu}",
        "torch": torch.__version__,
        "device": device,
        "threads": threads,
        "repeats": repeats,
        "per-cell limit (s)": limit_s,
        "per-cell memory (GiB)": mem_gib,
        "command": command,
    }


def sync() -> None:
    """Wait for queued GPU work (no-op on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of `repeats` calls of `fn` after `warmup` calls.

    Returns
    -------
    list[float]
        Wall-clock seconds of each timed call (GPU work synchronised).
    """
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out


@dataclass(frozen=True)
class Timing:
    """Result of `timed_ratio`.

    Attributes
    ----------
    seconds : float
        Median seconds of the measured function.
    ratio : float
        Median of the per-repeat ratios to the baseline.
    base_seconds : float
        Median seconds of the baseline.
    runs : int
        Timed runs after the warm-up; 0 when the warm-up alone used the time
        budget (its time is then reported).
    """

    seconds: float
    ratio: float
    base_seconds: float
    runs: int


def timed_ratio(
    fn: Callable[[], Any],
    base: Callable[[], Any],
    repeats: int,
    budget_s: float = math.inf,
    first_s: float | None = None,
) -> Timing:
    """Median seconds of `fn` and its median ratio to `base`.

    After one warm-up of each, the two alternate in every repeat, so that
    machine drift cancels in the ratio. Fewer than `repeats` runs are made
    when the timed warm-up of `fn` says they would exceed `budget_s`.
    `first_s`: the time of a warm-up call the caller already made (then `fn`
    is not warmed up again).

    Returns
    -------
    Timing
        Medians over the runs made (the warm-up alone when `runs` is 0).
    """
    base()
    (first,) = timed(fn, 1, warmup=0) if first_s is None else (first_s,)
    runs = max(0, min(repeats, int(budget_s // first) - 1))
    if runs == 0:
        (tb,) = timed(base, 1, warmup=0)
        return Timing(first, first / tb if tb > 0 else math.inf, tb, 0)
    times, bases, ratios = [], [], []
    for _ in range(runs):
        (tb,) = timed(base, 1, warmup=0)
        (tf,) = timed(fn, 1, warmup=0)
        times.append(tf)
        bases.append(tb)
        ratios.append(tf / tb if tb > 0 else math.inf)
    return Timing(
        statistics.median(times),
        statistics.median(ratios),
        statistics.median(bases),
        runs,
    )


def rss_bytes() -> int:
    """Resident memory of this process now (Linux `/proc`).

    Returns
    -------
    int
        Bytes (resident pages times 4096).
    """
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far.

    Returns
    -------
    int
        Bytes (`ru_maxrss`, read as KiB as on Linux).
    """
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def error_message(exc: BaseException) -> str:
    """``"TypeName: first line"`` of an exception, for result tables.

    Returns
    -------
    str
        The type name and the first line of the message (at most 160
        characters of it).
    """
    first = (str(exc).splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:160]}"


class PeakMemory:
    """Peak resident memory (sampled) and peak torch CUDA allocation of a block.

    Attributes
    ----------
    rss_bytes : int
        Peak RSS during the block minus RSS at its start (sampled every 2 ms;
        0 where `/proc` is unavailable).
    cuda_bytes : int
        Peak CUDA allocation during the block minus the allocation at its
        start (0 on CPU).

    Parameters
    ----------
    interval : float
        Seconds between RSS samples.
    sample_rss : bool
        False: no sampling thread (only `cuda_bytes`), e.g. around timed code.
    """

    def __init__(self, interval: float = 0.002, sample_rss: bool = True) -> None:
        self.interval = interval
        self.sample_rss = sample_rss
        self.rss_bytes = 0
        self.cuda_bytes = 0

    def __enter__(self) -> PeakMemory:
        try:
            self._base = rss_bytes() if self.sample_rss else None
        except OSError:
            self._base = None
        self._peak = self._base or 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        if self._base is not None:
            self._thread.start()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            self._cuda0 = torch.cuda.memory_allocated()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._base is not None:
            self._thread.join()
            self._peak = max(self._peak, rss_bytes())
            self.rss_bytes = self._peak - self._base
        if torch.cuda.is_available():
            self.cuda_bytes = torch.cuda.max_memory_allocated() - self._cuda0


def _child(
    fn: Callable[..., Any], args: tuple, limit_bytes: int | None, threads: int, queue
):
    if limit_bytes:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))
    try:
        torch.set_num_threads(threads)
        queue.put(fn(*args))
    except Exception as exc:  # reported to the parent
        queue.put({"error": error_message(exc)})


def run_limited(
    fn: Callable[..., Any],
    args: tuple,
    timeout_s: float,
    limit_bytes: int | None = None,
    threads: int | None = None,
) -> Any:
    """`fn(*args)` in a spawned child with a time and address-space limit.

    The child uses `threads` torch threads (default: the parent's). `fn`
    must be importable (module level).

    Returns
    -------
    Any
        The (picklable) result of `fn`, or ``{"error": message}`` on an
        exception, a timeout or a crash of the child.
    """
    ctx = mp.get_context("spawn")  # fork can deadlock torch's thread pool
    queue = ctx.Queue()
    threads = threads or torch.get_num_threads()
    child = ctx.Process(target=_child, args=(fn, args, limit_bytes, threads, queue))
    child.start()
    child.join(timeout=timeout_s)
    if child.is_alive():
        child.kill()
        child.join()
        return {"error": f"over the per-cell limit of {timeout_s:.0f} s"}
    if queue.empty():
        return {"error": f"child exited with code {child.exitcode}"}
    return queue.get()
