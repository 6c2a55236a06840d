"""Entry point of the ``laplace-lora`` command (and ``python -m laplace_lora_backend``).

This module is outside the `laplace_lora_backend` package on purpose: importing
the package registers its classes with laplace-torch (seconds), which
``laplace-lora --help`` and ``--version`` do not need. Every command imports
it (`laplace_lora_backend.cli`).
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import PackageNotFoundError, version

__all__ = ["COMMANDS", "DESCRIPTION", "main", "top_parser"]

DESCRIPTION = """\
Laplace-LoRA for laplace-torch: calibrated probabilities for LoRA fine-tuned
language models.

  laplace-lora finetune | fit | predict | evaluate
      your own adapter and data file (CSV, TSV, JSONL)
  laplace-lora demo
      fine-tune LoRA on SmolLM2-135M-Instruct and a real data set, fit
      Laplace-LoRA and its baselines: calibration table, JSON, reliability PNG
  laplace-lora bench | calibrate
      benchmarks against laplace-torch's backends, and the calibration battery
      (from a clone of the repository: they run its benchmarks/ folder)

'laplace-lora COMMAND --help' lists a command's options."""

# command: one-line help (the order of `laplace-lora --help`)
COMMANDS = {
    "demo": "MAP vs Laplace-LoRA calibration demo",
    "bench": "benchmarks vs laplace-torch's backends",
    "calibrate": "calibration battery: MAP vs LA, 8 cases",
    "finetune": "MAP-fine-tune a LoRA adapter on a file",
    "fit": "fit the Laplace posterior of an adapter",
    "predict": "class probabilities and uncertainty per row",
    "evaluate": "MAP vs LA on a labelled file: table and reliability PNG",
}


def _version() -> str:
    try:
        return version("laplace-lora-backend")
    except PackageNotFoundError:  # a source tree that is not installed
        return "unknown"


def top_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The ``laplace-lora`` parser and one (empty) sub-parser per command.

    Returns
    -------
    parser : argparse.ArgumentParser
    commands : dict[str, argparse.ArgumentParser]
        The sub-parsers, for `laplace_lora_backend.cli` to add the options.
    """
    parser = argparse.ArgumentParser(
        prog="laplace-lora",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {
        name: sub.add_parser(name, help=text) for name, text in COMMANDS.items()
    }
    return parser, commands


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``laplace-lora`` console script.

    ``--help`` and ``--version`` (and no command) are answered here; every
    command runs `laplace_lora_backend.cli.main`.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "--version"):
        top_parser()[0].parse_args(argv)  # prints and exits
        return
    from laplace_lora_backend.cli import main as run_command

    run_command(argv)


if __name__ == "__main__":
    main()
