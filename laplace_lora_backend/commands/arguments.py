"""Command-line options of ``finetune``, ``fit``, ``predict`` and ``evaluate``.

One set of model, data and task options serves every command; the task
options that ``finetune`` / ``fit`` used are saved beside the adapter and
read back when a flag is not given.
"""

from __future__ import annotations

import argparse

__all__ = ["add_command_arguments", "positive_int"]


def positive_int(text: str) -> int:
    """Parse a count that must be at least 1 (argparse ``type``).

    Returns
    -------
    int
        The count.

    Raises
    ------
    argparse.ArgumentTypeError
        Not an integer, or below 1.
    """
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _common(p: argparse.ArgumentParser, adapter: bool = True) -> None:
    p.add_argument(
        "--base-model",
        required=True,
        help="a local transformers model folder (a causal LM, read at answer "
        "tokens, or a ...ForSequenceClassification, read at its head), or "
        "'smollm2' (built in, offline)",
    )
    if adapter:
        p.add_argument("--adapter", required=True, help="PEFT adapter folder")
    p.add_argument("--data", required=True, help="CSV, TSV or JSONL file")
    p.add_argument("--text-column", help="default: text (or the saved task's)")
    p.add_argument("--label-column", help="default: label (or the saved task's)")
    p.add_argument(
        "--classes",
        help="comma-separated class labels in order; default: the saved task's, "
        "else the distinct labels of --data",
    )
    p.add_argument(
        "--answers",
        help="causal LMs: comma-separated one-token answer words, one per class "
        "(e.g. ' negative, neutral, positive'); default: ' ' + each class",
    )
    p.add_argument(
        "--template",
        help="prompt with a {text} field; the answer token follows it; default: "
        "'Text: {text}\\nAnswer:' ('{text}' for a sequence classifier, or the "
        "saved task's)",
    )
    p.add_argument(
        "--max-length",
        type=positive_int,
        help="tokens per prompt; default: 128 (or saved)",
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=8, help="default: %(default)s"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda; default: %(default)s")
    p.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="torch threads; default: OMP_NUM_THREADS if set, else the cores not busy",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_command_arguments(commands: dict[str, argparse.ArgumentParser]) -> None:
    """Add the options of the four commands to their sub-parsers.

    Parameters
    ----------
    commands : dict[str, argparse.ArgumentParser]
        The ``laplace-lora`` sub-parsers by name (`laplace_lora_cli.top_parser`).
    """
    p = commands["finetune"]
    _common(p, adapter=False)
    p.add_argument("--output", required=True, help="adapter folder to write")
    p.add_argument(
        "--epochs", type=positive_int, default=4, help="default: %(default)s"
    )
    p.add_argument("--lr", type=float, default=2e-3, help="default: %(default)s")
    p.add_argument(
        "--lora-r", type=positive_int, default=8, help="default: %(default)s"
    )
    p.add_argument(
        "--target-modules",
        default=None,
        help="comma-separated module names (or all-linear); default: PEFT's for "
        "the architecture (q_proj,v_proj for Llama)",
    )
    p.add_argument("--seed", type=int, default=0, help="default: %(default)s")

    p = commands["fit"]
    _common(p)
    p.add_argument("--val-data", help="labelled validation file (prior 'auto')")
    p.add_argument(
        "--structure", choices=["kron", "diag"], default="kron", help="default: kron"
    )
    p.add_argument(
        "--prior",
        choices=["marglik", "auto", "gridsearch"],
        help="optimize_prior_precision method; default: auto with --val-data, "
        "else marglik (with its trust region)",
    )
    p.add_argument("--output", help="posterior folder; default: the adapter's")

    for name in ("predict", "evaluate"):
        p = commands[name]
        _common(p)
        p.add_argument("--posterior", help="posterior folder; default: the adapter's")
        if name == "predict":
            p.add_argument("--output", required=True, help="OUT.jsonl or OUT.csv")
            p.add_argument("--with-map", action="store_true", help="add MAP's columns")
        else:
            p.add_argument("--output", required=True, help="folder for the results")
