"""The ``laplace-lora`` commands (entry point: the top-level `laplace_lora_cli`).

Adds each command's options to the parser of `laplace_lora_cli.top_parser`
and runs the command: ``demo`` (`laplace_lora_backend.demo`), ``bench`` and
``calibrate`` (`benchmarks/`, from a clone), ``finetune | fit | predict |
evaluate`` (`laplace_lora_backend.commands`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from laplace_lora_backend.commands.arguments import add_command_arguments
from laplace_lora_backend.demo.config import add_arguments as add_demo_arguments
from laplace_lora_backend.demo.config import from_arguments as demo_from_arguments
from laplace_lora_cli import top_parser


def _bench_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="smoke test (minutes)")
    parser.add_argument(
        "--output",
        default="benchmarks/results",
        help="folder for bench.{md,json} and the plot; default: %(default)s",
    )
    parser.add_argument(
        "--sections",
        nargs="+",
        default=["models", "widths", "outputs"],
        choices=["models", "widths", "outputs"],
        help="suite sections to run; default: all",
    )
    parser.add_argument(
        "--smollm2", action="store_true", help="add the SmolLM2-135M workload"
    )
    _matrix_args(parser)
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed repetitions per cell; default: 3 (2 with --quick; 1 with --matrix)",
    )
    parser.add_argument(
        "--limit-s",
        type=float,
        default=600.0,
        help="seconds per cell before it is skipped; default: %(default)s",
    )
    parser.add_argument(
        "--mem-gib",
        type=float,
        default=16.0,
        help="memory per cell before it is skipped; default: %(default)s",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads; default: %(default)s"
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="cpu or cuda (results get a _gpu suffix); default: %(default)s",
    )


def _matrix_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--matrix",
        action="store_true",
        help="run the SmolLM2 workload matrix instead (placements x lengths x "
        "classes; writes bench_matrix.{md,json})",
    )
    parser.add_argument(
        "--placements",
        nargs="+",
        default=None,
        choices=["q,v", "k,o", "all-linear"],
        help="--matrix: LoRA placements; default: all",
    )
    parser.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        default=None,
        help="--matrix: prompt lengths in tokens; default: 48 128 512",
    )
    parser.add_argument(
        "--classes",
        type=int,
        nargs="+",
        default=None,
        choices=[3, 5],
        help="--matrix: 3 (drug reviews) and/or 5 (BBC news); default: both",
    )


def _calibrate_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="smollm2",
        choices=["smollm2", "tiny"],
        help="'tiny': random-init tiny Llama (smoke test); default: %(default)s",
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1], help="default: %(default)s"
    )
    parser.add_argument(
        "--cases",
        nargs="+",
        default=None,
        help="case names (e.g. drugreview-qv-64); default: all 8",
    )
    parser.add_argument(
        "--output",
        default="benchmarks/results/calibration",
        help="folder for runs/ and the summary; default: %(default)s",
    )
    parser.add_argument(
        "--shard",
        default="0/1",
        help="run every n-th (case, seed) starting at i: 'i/n'; default: %(default)s",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads; default: %(default)s"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes (smoke test with --model tiny)",
    )
    parser.add_argument(
        "--reevaluate",
        action="store_true",
        help="recompute every run's metrics from its saved artifacts (no "
        "fine-tuning, fitting or Jacobians)",
    )
    parser.add_argument(
        "--readme",
        default=None,
        help="also write the results block into this README (between the "
        "calibration markers)",
    )
    parser.add_argument(
        "--aggregate-only",
        action="store_true",
        help="only write the summary from existing run files",
    )


def _benchmarks_on_path() -> None:
    """Make the source checkout's `benchmarks/` importable.

    The benchmark suite and the calibration battery are applications of the
    library, kept out of the wheel; they run from a clone (``pip install -e
    .``), whose root is the package folder's parent.

    Raises
    ------
    SystemExit
        Outside a clone, saying how to get one.
    """
    root = Path(__file__).resolve().parents[1]
    if (root / "benchmarks" / "suite").is_dir():
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
        return
    raise SystemExit(
        "`laplace-lora bench` and `laplace-lora calibrate` run the benchmarks/ "
        "folder of the source repository, which the installed package does not "
        "ship: clone the repository, `pip install -e .` in it, and run from there."
    )


def _calibrate(args: argparse.Namespace) -> None:
    _benchmarks_on_path()
    from benchmarks.calibration import (
        CASES,
        BatteryConfig,
        aggregate,
        run_battery,
        update_readme,
    )

    cfg = BatteryConfig(
        model=args.model, seeds=args.seeds, output=args.output, threads=args.threads
    )
    if args.quick:
        cfg.n_val, cfg.n_test, cfg.epochs = 16, 24, 2
    cases = CASES
    if args.cases:
        unknown = sorted(set(args.cases) - {c.name for c in CASES})
        if unknown:
            raise SystemExit(
                f"Unknown case(s) {unknown}; choose from {[c.name for c in CASES]}."
            )
        cases = [c for c in CASES if c.name in args.cases]
    if args.quick:
        cases = [type(c)(c.dataset, c.targets, 24) for c in cases]
    i, n = (int(v) for v in args.shard.split("/"))
    if not args.aggregate_only:
        run_battery(cfg, cases, (i, n), reevaluate=args.reevaluate)
    if i == 0 or args.aggregate_only:
        summary = aggregate(cfg, cases)
        if args.readme:
            update_readme(summary, args.readme)


COMMANDS = ("finetune", "fit", "predict", "evaluate")


def _run_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Run a command on the user's files; bad input: message and exit code 2."""
    from laplace_lora_backend.commands import run
    from laplace_lora_backend.commands.files import CommandError

    try:
        summary = getattr(run, args.command)(args)
    except CommandError as err:
        parser.exit(2, f"laplace-lora {args.command}: error: {err}\n")
    print(json.dumps(summary, indent=1))


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``laplace-lora`` console script."""
    parser, commands = top_parser()
    add_demo_arguments(commands["demo"])
    _bench_args(commands["bench"])
    _calibrate_args(commands["calibrate"])
    add_command_arguments(commands)
    args = parser.parse_args(argv)
    if args.command in COMMANDS:
        _run_command(parser, args)
    elif args.command == "demo":
        from laplace_lora_backend.demo import run_demo

        run_demo(demo_from_arguments(args))
    elif args.command == "calibrate":
        _calibrate(args)
    elif args.command == "bench" and args.matrix:
        _benchmarks_on_path()
        from benchmarks.suite.matrix import run_matrix

        run_matrix(
            output=args.output,
            placements=args.placements,
            lengths=args.lengths,
            classes=args.classes,
            repeats=args.repeats or 1,
            limit_s=args.limit_s,
            mem_gib=args.mem_gib,
            threads=args.threads,
            device=args.device,
            command="laplace-lora " + " ".join(sys.argv[1:] if argv is None else argv),
        )
    elif args.command == "bench":
        _benchmarks_on_path()
        from benchmarks.suite.suite import run_suite

        run_suite(
            output=args.output,
            quick=args.quick,
            smollm2_workload=args.smollm2,
            sections=tuple(args.sections),
            repeats=args.repeats,
            limit_s=args.limit_s,
            mem_gib=args.mem_gib,
            threads=args.threads,
            device=args.device,
            command="laplace-lora " + " ".join(sys.argv[1:] if argv is None else argv),
        )


if __name__ == "__main__":
    main()
