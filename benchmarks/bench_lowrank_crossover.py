"""Where do low-rank wide factors start to pay? Dense vs low-rank, by width.

One LoRA layer of width `d` (the suite's `wide_layer` workload: 64 inputs of
32 tokens, a decaying input spectrum), fitted by `LoRAKronLaplace` with dense
factors (``lowrank_threshold=None``) and with the wide factor low-rank
(``lowrank_threshold=d``, rank 16), side by side in one process, alternating.
Per width: fit time (median), probit predictive time on one batch, factor
memory, and the relative difference of the log marginal likelihood at prior
precision 1 (what compression costs in evidence).

Usage: ``python benchmarks/bench_lowrank_crossover.py [--widths ...]
[--repeats 3]``. Writes ``benchmarks/results/lowrank_crossover.{json,md}``.
The measurement behind the cost-aware default `lowrank_threshold=1024`
(`laplace_lora_backend.matrix.lowrank_options.DEFAULT_LOWRANK_THRESHOLD`).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from laplace import Laplace  # noqa: E402

import laplace_lora_backend  # noqa: E402,F401
from benchmarks.common import (  # noqa: E402
    command_line,
    machine,
    script_parser,
    write_results,
)
from benchmarks.suite.workloads import Loader, wide_layer  # noqa: E402


def _fit(w, threshold: int | None):
    la = Laplace(
        w.model,
        "classification",
        subset_of_weights="lora",
        hessian_structure="kron",
        lowrank_threshold=threshold,
    )
    t0 = time.perf_counter()
    la.fit(Loader(w.train))
    fit_s = time.perf_counter() - t0
    la.prior_precision = 1.0
    t0 = time.perf_counter()
    la(w.test, link_approx="probit")
    return la, fit_s, time.perf_counter() - t0


def measure(d: int, repeats: int) -> dict:
    """Dense and low-rank cells at width `d`.

    Returns
    -------
    dict
        Medians (seconds), factor MiB and the evidence of both.
    """
    w = wide_layer(d, n=64, tokens=32)
    cells = {"dense": None, "low-rank": d}
    times: dict[str, dict[str, list[float]]] = {
        c: {"fit": [], "predict": []} for c in cells
    }
    out: dict = {"width": d}
    for i in range(repeats):
        order = list(cells) if i % 2 == 0 else list(reversed(cells))
        for c in order:
            la, fit_s, pred_s = _fit(w, cells[c])
            times[c]["fit"].append(fit_s)
            times[c]["predict"].append(pred_s)
            out[f"{c} MiB"] = la.H_facs.factor_bytes() / 2**20
            out[f"{c} lml"] = float(la.log_marginal_likelihood())
    for c in cells:
        out[f"{c} fit s"] = statistics.median(times[c]["fit"])
        out[f"{c} predict s"] = statistics.median(times[c]["predict"])
    out["lml rel diff"] = abs(out["low-rank lml"] - out["dense lml"]) / abs(
        out["dense lml"]
    )
    return out


def to_markdown(result: dict) -> str:
    lines = [
        f"`{result['command']}` ({result['machine']}; medians of {result['repeats']} "
        "alternating repeats; one LoRA layer, 64 inputs x 32 tokens, rank 16)",
        "",
        "| width | fit dense (s) | fit low-rank (s) | low-rank / dense | predict dense "
        "(s) | predict low-rank (s) | factors dense / low-rank (MiB) | evidence rel. "
        "diff |",
        "|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in result["widths"]:
        lines.append(
            f"| {r['width']} | {r['dense fit s']:.3f} | {r['low-rank fit s']:.3f} | "
            f"{r['low-rank fit s'] / r['dense fit s']:.2f} | "
            f"{r['dense predict s']:.3f} | {r['low-rank predict s']:.3f} | "
            f"{r['dense MiB']:.2f} / {r['low-rank MiB']:.2f} | "
            f"{r['lml rel diff']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument(
        "--widths",
        type=int,
        nargs="+",
        default=[256, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192],
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for d in args.widths:
        rows.append(measure(d, args.repeats))
        print(rows[-1], flush=True)
    result = {
        "command": command_line("benchmarks/bench_lowrank_crossover.py"),
        "machine": machine(args.threads),
        "repeats": args.repeats,
        "widths": rows,
    }
    write_results(args.output, "lowrank_crossover", result, to_markdown(result))


if __name__ == "__main__":
    main()
