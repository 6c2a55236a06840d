"""The workload matrix of ``laplace-lora bench --matrix``: users' shapes.

SmolLM2-135M-Instruct with LoRA (r=8) on each of three placements (q,v; k,o;
every linear layer of the blocks), prompts of 48, 128 and 512 tokens, and 3
classes (drug reviews) or 5 (BBC news topics). In every cell, each contender
of `MATRIX_CONTENDERS` runs in its own limited child process (the suite's
`model_cell`): fit, marglik prior tuning and GLM probit predictive time as
ratios to a plain forward+backward (forward for the predictive), peak
memory, factor memory, and agreement with ours where both compute the same
quantity.

The training set per cell is about `TOKENS_PER_CELL` tokens (8 prompts of
48 tokens, 2 of 128, 2 of 512), in batches of 2, so that the 18 cells fit an
hour on 2 CPU cores; the ratios, not the absolute times, are the result.
Subsets of the grid can run in separate processes (``--lengths``,
``--placements``, ``--classes``, each with its own ``--output``) and be
merged with ``python -m benchmarks.suite.matrix A.json B.json --output DIR``.
The headline (`headline`): per cell and curvature type, whether ours is
faster than every laplace-torch backend computing the same quantity, and
the worst ratio of ours to the fastest of them.
"""

from __future__ import annotations

import json
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from benchmarks.suite.measure import run_limited, run_meta
from benchmarks.suite.suite import (
    _address_limit,
    _agreement,
    fmt_number,
    md_table,
    model_cell,
)
from benchmarks.suite.workloads import smollm2

__all__ = ["MATRIX_CONTENDERS", "cells", "headline", "merge", "run_matrix"]

PLACEMENTS: dict[str, tuple[str, ...]] = {
    "q,v": ("q_proj", "v_proj"),
    "k,o": ("k_proj", "o_proj"),
    "all-linear": (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ),
}
LENGTHS = (48, 128, 512)
DATASETS = {3: "drugreview", 5: "bbcnews"}
TOKENS_PER_CELL = 400
BATCH = 2
# curvature type -> (ours, laplace-torch backends computing the same K-FAC)
COMPARISONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "GGN": (
        "ours kron default",
        ("laplace-torch kron CurvlinopsGGN", "laplace-torch kron AsdlGGN"),
    ),
    "EF": (
        "ours kron EF",
        ("laplace-torch kron CurvlinopsEF", "laplace-torch kron AsdlEF"),
    ),
}
MATRIX_CONTENDERS = [
    "ours kron default",
    "ours kron EF",
    "ours kron MC",
    *COMPARISONS["GGN"][1],
    *COMPARISONS["EF"][1],
]
# laplace-torch's BackPack backends refuse a model with frozen weights
NOT_RUN = {
    "laplace-torch kron BackPackGGN / BackPackEF": "refused by laplace-torch: "
    "'If some grad are switched off, the BackPACK and Asdfghjkl backends are "
    "not supported' (every PEFT model)",
}


def cells(
    placements: list[str], lengths: list[int], classes: list[int]
) -> list[dict[str, Any]]:
    """The matrix's cells: placement, prompt length, classes, examples.

    Returns
    -------
    list of dict
        ``{"placement", "tokens", "classes", "n"}`` per cell.
    """
    return [
        {
            "placement": p,
            "tokens": L,
            "classes": C,
            "n": max(BATCH, TOKENS_PER_CELL // L // BATCH * BATCH),
        }
        for p in placements
        for L in lengths
        for C in classes
    ]


def _workload(cell: dict[str, Any]):
    return smollm2(
        n=cell["n"],
        max_length=cell["tokens"],
        batch_size=BATCH,
        targets=PLACEMENTS[cell["placement"]],
        dataset=DATASETS[cell["classes"]],
    )


def headline(rows: list[dict[str, Any]], stage: str = "fit_s") -> dict[str, Any]:
    """In how many cells ours is fastest, and the worst ratio, per comparison.

    Parameters
    ----------
    rows : list of dict
        Matrix rows (``{"cell", "cells": [model cells]}``).
    stage : str
        ``"fit_s"`` or ``"predict_s"`` (seconds), or ``"fit_x"`` /
        ``"predict_x"``: each contender's time over the forward+backward
        (forward) its own child process measured just before, which cancels
        the machine's drift between the contenders' processes.

    Returns
    -------
    dict
        Per curvature type: ``fastest`` (cells where ours is faster than every
        laplace-torch backend that ran), ``compared`` (cells where at least
        one ran), ``worst`` (max of ours / fastest laplace-torch) and its cell.
    """
    out: dict[str, Any] = {}
    for kind, (ours, theirs) in COMPARISONS.items():
        fastest, compared, worst, where = 0, 0, 0.0, None
        for row in rows:
            by = {c["contender"]: c for c in row["cells"]}
            mine = by.get(ours, {}).get(stage)
            other = [by[t][stage] for t in theirs if stage in by.get(t, {})]
            if mine is None or not other:
                continue
            compared += 1
            ratio = mine / min(other)
            fastest += ratio < 1.0
            if ratio > worst:
                worst, where = ratio, row["cell"]
        out[kind] = {
            "fastest": fastest,
            "compared": compared,
            "worst": worst,
            "worst_cell": where,
        }
    return out


HEADLINE_STAGES = {
    "fit_s": "fit (s)",
    "predict_s": "GLM predictive (s)",
    "fit_x": "fit / own fwd+bwd",
    "predict_x": "GLM predictive / own fwd",
}


def _cell_key(cell: dict[str, Any]) -> tuple[str, int, int]:
    return cell["placement"], cell["tokens"], cell["classes"]


def _cell_name(cell: dict[str, Any]) -> str:
    return f"{cell['placement']}, {cell['tokens']} tok, C={cell['classes']}"


COLUMNS = {
    "fit_x": "fit / fwd+bwd",
    "fit_rss_mib": "fit peak RSS (MiB)",
    "factor_mib": "factors (MiB)",
    "marglik_x": "marglik / fwd+bwd",
    "predict_x": "predict / fwd",
    "lml_rel_diff": "lml rel. diff",
}


def to_markdown(result: dict[str, Any]) -> str:
    """The matrix as Markdown: headline, then one table per cell.

    Returns
    -------
    str
    """
    lines = ["# laplace-lora bench --matrix", ""]
    lines += [f"- {k}: {v}" for k, v in result["meta"].items()]
    lines += ["", "## Headline", ""]
    rows = []
    for stage, label in HEADLINE_STAGES.items():
        for kind, h in result["headline"].get(stage, {}).items():
            rows.append(
                [
                    f"{label}, {kind}",
                    f"{h['fastest']} / {h['compared']}",
                    h["worst"],
                    _cell_name(h["worst_cell"]) if h["worst_cell"] else "-",
                ]
            )
    lines += md_table(
        [
            "ours vs fastest laplace-torch",
            "cells ours fastest",
            "worst ours / theirs",
            "worst cell",
        ],
        rows,
    )
    lines += [""] + [f"- not run: {k}: {v}" for k, v in NOT_RUN.items()]
    for row in result["rows"]:
        base = next((c["fwd_bwd_s"] for c in row["cells"] if "fwd_bwd_s" in c), None)
        lines += [
            "",
            f"## {_cell_name(row['cell'])} ({row['cell']['n']} examples; "
            f"forward+backward {fmt_number(base)} s)",
            "",
        ]
        table = []
        for c in row["cells"]:
            if "error" in c:
                table.append([c["contender"], c["error"]] + [""] * len(COLUMNS))
                continue
            notes = "; ".join(
                f"{k.split('_')[0]}: {c[k]}"
                for k in ("marglik_error", "predict_error")
                if k in c
            )
            table.append([c["contender"]] + [c.get(k) for k in COLUMNS] + [notes])
        lines += md_table(["contender", *COLUMNS.values(), "notes"], table)
    return "\n".join(lines) + "\n"


def run_matrix(
    output: str = "benchmarks/results",
    placements: list[str] | None = None,
    lengths: list[int] | None = None,
    classes: list[int] | None = None,
    repeats: int = 1,
    limit_s: float = 300.0,
    mem_gib: float = 16.0,
    threads: int = 1,
    command: str | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Run the matrix; write ``bench_matrix[_gpu].{md,json}`` after every cell.

    Each contender of each cell runs in a child process limited to 4 stages
    of `limit_s` and `mem_gib` of address space (none on CUDA); a failure or
    an exceeded limit is reported in its cell.

    Returns
    -------
    dict
        ``"meta"``, ``"rows"`` (one per cell) and ``"headline"``.
    """
    torch.set_num_threads(threads)
    cuda = torch.device(device).type == "cuda"
    t0 = time.perf_counter()
    grid = cells(
        placements or list(PLACEMENTS), lengths or list(LENGTHS), classes or [3, 5]
    )
    command = command or "laplace-lora bench --matrix"
    result: dict[str, Any] = {
        "meta": run_meta(device, threads, repeats, limit_s, mem_gib, command),
        "rows": [],
    }
    name = "bench_matrix" + ("_gpu" if cuda else "")
    for cell in tqdm(grid, desc="matrix"):
        make = partial(_workload, cell)
        out = []
        for contender_name in MATRIX_CONTENDERS:
            args = (make, contender_name, repeats, limit_s, device)
            limit = _address_limit(mem_gib, device)
            res = run_limited(model_cell, args, 4 * limit_s, limit)
            res.setdefault("contender", contender_name)
            out.append(res)
        _agreement(out)
        result["rows"].append({"cell": cell, "cells": out})
        # every finished cell is written: an interrupted run keeps them
        rows = result["rows"]
        result["headline"] = {s: headline(rows, s) for s in HEADLINE_STAGES}
        result["meta"]["seconds"] = round(time.perf_counter() - t0, 1)
        _write(result, Path(output), name, quiet=len(rows) < len(grid))
    return result


def _write(
    result: dict[str, Any], out_dir: Path, name: str, quiet: bool = False
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2))
    (out_dir / f"{name}.md").write_text(to_markdown(result))
    if not quiet:
        print(to_markdown(result), file=sys.stderr)


def merge(paths: list[str], output: str, name: str = "bench_matrix") -> dict:
    """One result from the results of parts of the grid run separately.

    A part may itself be a merged result. A cell found in several parts is
    taken from the last of them (a cell run again replaces the earlier run;
    ``meta["replaced"]`` names it).

    Returns
    -------
    dict
        The rows of every part in grid order, the headline recomputed, the
        parts' commands and seconds in ``meta``.

    Raises
    ------
    ValueError
        If the parts differ in machine, device, threads or repeats.
    """
    parts = [json.loads(Path(p).read_text()) for p in paths]
    same = ("machine", "torch", "device", "threads", "repeats")
    for part in parts[1:]:
        for key in same:
            if part["meta"][key] != parts[0]["meta"][key]:
                raise ValueError(
                    f"Cannot merge {paths}: they differ in {key!r} "
                    f"({part['meta'][key]!r} vs {parts[0]['meta'][key]!r})."
                )
    order = {
        _cell_key(c): i
        for i, c in enumerate(cells(list(PLACEMENTS), list(LENGTHS), [3, 5]))
    }
    by_cell: dict[tuple, dict[str, Any]] = {}
    replaced = []
    for part in parts:
        for row in part["rows"]:
            key = _cell_key(row["cell"])
            if key in by_cell:
                replaced.append(_cell_name(row["cell"]))
            by_cell[key] = row
    rows = [by_cell[k] for k in sorted(by_cell, key=lambda k: order.get(k, -1))]
    meta = dict(parts[0]["meta"])
    meta["command"] = " + ".join(p["meta"]["command"] for p in parts)
    meta["seconds"] = [
        s
        for p in parts
        for s in (
            p["meta"]["seconds"]
            if isinstance(p["meta"]["seconds"], list)
            else [p["meta"]["seconds"]]
        )
    ]
    if replaced:
        meta["replaced"] = ", ".join(replaced)
    result = {
        "meta": meta,
        "rows": rows,
        "headline": {s: headline(rows, s) for s in HEADLINE_STAGES},
    }
    _write(result, Path(output), name)
    return result


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Merge parts of the matrix.")
    parser.add_argument("parts", nargs="+")
    parser.add_argument("--output", default="benchmarks/results")
    args = parser.parse_args()
    merge(args.parts, args.output)
