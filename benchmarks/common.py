"""What the benchmark scripts share: their common arguments and the writing
of a result as ``<stem>.json`` + ``<stem>.md``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["command_line", "machine", "script_parser", "sync", "timed", "write_results"]


def script_parser(
    doc: str | None, repeats: int | None = 3, threads: int = 2
) -> argparse.ArgumentParser:
    """A parser with ``--threads``, ``--output`` and (unless `repeats` is
    None) ``--repeats``; its description is the first line of `doc`.

    Returns
    -------
    argparse.ArgumentParser
    """
    parser = argparse.ArgumentParser(description=(doc or "").split("\n")[0])
    if repeats is not None:
        parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--threads", type=int, default=threads)
    parser.add_argument("--output", default="benchmarks/results")
    return parser


def machine(threads: int) -> str:
    """This machine's cores, the torch version and the threads used.

    Returns
    -------
    str
    """
    return f"{os.cpu_count()} cores, torch {torch.__version__}, {threads} threads"


def command_line(script: str, argv: list[str] | None = None) -> str:
    """The command that reproduces a run (`argv`, default ``sys.argv[1:]``).

    Returns
    -------
    str
    """
    args = sys.argv[1:] if argv is None else argv
    return " ".join([f"python {script}", *args])


def write_results(
    output: str | Path, stem: str, result: dict[str, Any], markdown: str, indent=1
) -> None:
    """Write ``<stem>.json`` and ``<stem>.md`` under `output`; print the table."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=indent))
    (out / f"{stem}.md").write_text(markdown)
    print(markdown)


def sync(device: str) -> None:
    """Wait for queued GPU work."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str) -> tuple[Any, float]:
    """`fn()` and its wall-clock seconds (queued GPU work waited for).

    Returns
    -------
    tuple[Any, float]
    """
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0
