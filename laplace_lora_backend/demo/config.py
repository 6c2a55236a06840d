"""`DemoConfig`: the settings of one demo run, and its command-line options."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from laplace_lora_backend.demo.data import DATASETS

__all__ = [
    "METHODS",
    "PRIOR_MODES",
    "DemoConfig",
    "add_arguments",
    "free_threads",
    "from_arguments",
]

METHODS = ["MAP", "TS", "MCD", "LLLA", "LA", "LA-diag"]

PRIOR_MODES = ("auto", "marglik", "validation")


def free_threads() -> int:
    """Torch threads to use when none are asked for.

    ``OMP_NUM_THREADS`` if set; else the cores this process may run on that
    are not busy: minus the other runnable threads now (``/proc/loadavg``;
    elsewhere the 1-minute load average), at least 1. Two jobs that each take
    every core oversubscribe them: on 2 cores, a fine-tuning step went from
    1.8 s to 36 s with another job running.

    Returns
    -------
    int
        At least 1.
    """
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
    cores = cores or os.cpu_count() or 1
    return max(1, cores - round(_busy_threads()))


def _busy_threads() -> float:
    """Runnable threads of other processes now (Linux), else the load average.

    Returns
    -------
    float
    """
    try:
        running = Path("/proc/loadavg").read_text().split()[3].split("/")[0]
        return max(0, int(running) - 1)  # minus this process's own thread
    except (OSError, IndexError, ValueError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def _opt(default: Any, help: str, **kwargs: Any) -> Any:
    """A field with its command-line help (and argparse extras) as metadata.

    Returns
    -------
    dataclasses.Field
    """
    factory = (lambda: list(default)) if isinstance(default, list) else None
    meta = {"help": help, **kwargs}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DemoConfig:
    """Settings of one demo run (recorded in the JSON).

    Every field is a command-line option of ``laplace-lora demo``
    (`add_arguments`); its help is the field's metadata. The sizes are chosen
    so that one seed runs in about 13 minutes on 2 CPU cores: 8 epochs over a
    small training set, the regime where fine-tuned LLMs get overconfident
    (the paper's setting).
    """

    dataset: str = _opt("drugreview", "data set", choices=sorted(DATASETS))
    model: str = _opt(
        "smollm2",
        "'tiny': random-init tiny Llama (smoke test)",
        choices=["smollm2", "tiny"],
    )
    seeds: list[int] = _opt([0], "seeds, one run each")
    n_train: int = _opt(128, "training examples")
    n_val: int = _opt(64, "validation examples (temperature scaling, prior)")
    n_test: int = _opt(200, "test examples")
    max_length: int = _opt(48, "tokens per prompt")
    batch_size: int = _opt(8, "batch size")
    steps: int = _opt(128, "fine-tuning steps")
    lr: float = _opt(2e-3, "fine-tuning learning rate")
    weight_decay: float = _opt(0.01, "fine-tuning weight decay")
    lora_dropout: float = _opt(0.1, "LoRA dropout (also MC dropout's)")
    target_modules: list[str] = _opt(
        ["q_proj", "v_proj", "lm_head"], "modules that get LoRA"
    )
    mcd_samples: int = _opt(4, "MC dropout samples")
    kfac_backend: str = _opt(
        "mc", "curvature of the Laplace methods", choices=["ggn", "mc", "ef"]
    )
    prior: str = _opt(
        "auto",
        "prior precision of the Laplace methods (auto: marglik with its trust "
        "region, checked against MAP on validation NLL)",
        choices=list(PRIOR_MODES),
    )
    threads: int = _opt(
        0, "torch threads; 0: OMP_NUM_THREADS if set, else the cores not busy"
    )
    output: str = _opt("demo-output", "folder for the results")
    quick: bool = _opt(False, "few examples and steps (smoke test, minutes)")

    @classmethod
    def quick_config(cls, **overrides: Any) -> DemoConfig:
        """Small sizes for smoke tests (a few minutes on a CPU).

        Returns
        -------
        DemoConfig
            The quick sizes, then `overrides`, with ``quick=True``.
        """
        base = dict(
            n_train=48,
            n_val=24,
            n_test=48,
            steps=12,
            max_length=48,
            batch_size=8,
            mcd_samples=4,
            quick=True,
        )
        base.update(overrides)
        return cls(**base)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One command-line option per `DemoConfig` field, generated from it.

    Defaults are left unset (None) so that `from_arguments` can tell which
    options were given; the help shows the field's default.
    """
    for f in fields(DemoConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default_factory() if callable(f.default_factory) else f.default
        help_ = f"{f.metadata['help']} (default: {default})"
        if f.type in ("bool", bool):
            parser.add_argument(flag, action="store_true", help=help_)
            continue
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        item = {"int": int, "float": float, "str": str}
        nargs = "+" if kind.startswith("list[") else None
        convert = item[kind.removeprefix("list[").removesuffix("]")]
        parser.add_argument(
            flag,
            type=convert,
            nargs=nargs,
            default=None,
            choices=f.metadata.get("choices"),
            help=help_,
        )


def from_arguments(args: argparse.Namespace) -> DemoConfig:
    """The `DemoConfig` of parsed `add_arguments` options.

    ``--quick`` starts from `DemoConfig.quick_config`; every option given
    overrides it.

    Returns
    -------
    DemoConfig
    """
    given = {
        f.name: getattr(args, f.name)
        for f in fields(DemoConfig)
        if f.name != "quick" and getattr(args, f.name, None) is not None
    }
    if getattr(args, "quick", False):
        return DemoConfig.quick_config(**given)
    return DemoConfig(**given)
