"""Helpers shared by the benchmark scripts: run metadata and result files."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch


def run_meta(script: str, args: Any, device: torch.device) -> dict[str, Any]:
    """Machine, versions, threads, repeats and the command of this run."""
    gpu = f", {torch.cuda.get_device_name()}" if device.type == "cuda" else ""
    return {
        "machine": f"{platform.machine()} {os.cpu_count()} cores{gpu}",
        "torch": torch.__version__,
        "threads": args.threads,
        "repeats": args.repeats,
        "command": f"python benchmarks/{script} " + " ".join(sys.argv[1:]),
    }


def write_results(output: str, name: str, payload: dict, markdown: str) -> Path:
    """Write `name.json` and `name.md` to `output`; print the Markdown."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2))
    (out / f"{name}.md").write_text(markdown + "\n")
    print(markdown)
    return out
