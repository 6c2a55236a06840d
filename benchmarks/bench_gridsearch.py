"""Prior grid search: ours (cached Jacobians) vs laplace-torch's, side by side.

On the same PEFT model, fitted posterior, validation set and grid:

- ours: ``optimize_prior_precision(method="gridsearch", val_loader=val)`` on a
  `LoRAKronLaplace` with laplace-torch's probit (``center_logits=False``), so
  both score the same predictive; validation Jacobians once, then a few matrix
  products per grid point;
- laplace-torch: ``KronLaplace(model, backend=CurvlinopsGGN)``, the same call:
  the whole GLM predictive (``torch.func`` Jacobians) per grid point;
- brute force: every grid point scored with ``la(x)`` and a fresh NLL.

Reported: seconds (median of the repeats, the two timed alternately), the
speed-up, and which prior precision each picks. On SmolLM2 laplace-torch's
grid search takes hours (a full predictive per point), so it is timed on
``--upstream-points`` grid points and extrapolated linearly to the grid (each
point is one identical pass over the validation set); the JSON says so.

Usage: ``python benchmarks/bench_gridsearch.py [--smollm2] [--output DIR]``
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# run as `python benchmarks/<script>.py`: the repository root holds `benchmarks`
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from laplace import KronLaplace, Laplace  # noqa: E402
from laplace.curvature import CurvlinopsGGN  # noqa: E402

import laplace_lora_backend  # noqa: E402,F401
from benchmarks.common import (  # noqa: E402
    script_parser,
    write_results,
)
from benchmarks.suite.workloads import (  # noqa: E402
    Loader,
    _random_batches,
    smollm2,
    tiny_lm,
)
from laplace_lora_backend.prior_validation import nll  # noqa: E402


def fitted(wl):
    ours = Laplace(
        wl.model,
        "classification",
        subset_of_weights="lora",
        hessian_structure="kron",
        center_logits=False,
    )
    ours.fit(Loader(wl.train))
    ref = KronLaplace(wl.model, "classification", backend=CurvlinopsGGN)
    ref.fit(Loader(wl.train))
    return ours, ref


def timed(fn, la):
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    return seconds, float(la.prior_precision.flatten()[0])


def brute_force(la, val, grid):
    losses = []
    for p in grid:
        la.prior_precision = float(p)
        probs = torch.cat([la(b) for b in val])
        losses.append(float(nll(probs, torch.cat([b["labels"] for b in val]))))
    return float(grid[min(range(len(grid)), key=losses.__getitem__)])


def run(wl, val, grid_size, repeats, upstream_points):
    ours, ref = fitted(wl)
    kwargs = dict(method="gridsearch", val_loader=Loader(val), grid_size=grid_size)
    t_ours, t_ref = [], []
    for _ in range(repeats):  # alternate the two
        s, p_ours = timed(lambda: ours.optimize_prior_precision(**kwargs), ours)
        t_ours.append(s)
        n = upstream_points or grid_size
        kw = dict(kwargs, grid_size=n)
        if upstream_points:  # a sub-grid with the same spacing per point
            kw.update(log_prior_prec_min=-4, log_prior_prec_max=-4 + 8 * (n - 1) / 99)
        s, p_ref = timed(lambda kw=kw: ref.optimize_prior_precision(**kw), ref)
        t_ref.append(s * grid_size / n)
    grid = torch.logspace(-4, 4, grid_size)
    return {
        "workload": wl.name,
        "n_val": sum(len(b["labels"]) for b in val),
        "grid_size": grid_size,
        "ours_s": statistics.median(t_ours),
        "laplace_torch_s": statistics.median(t_ref),
        "laplace_torch_points_timed": upstream_points or grid_size,
        "speedup": statistics.median(t_ref) / statistics.median(t_ours),
        "ours_prior": p_ours,
        "laplace_torch_prior": None if upstream_points else p_ref,
        "brute_force_prior": brute_force(ours, val, grid),
    }


def main():
    parser = script_parser(__doc__)
    parser.add_argument("--smollm2", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    wl = tiny_lm("llama", hidden=64, layers=2, n=32, tokens=32, vocab=256)
    val = _random_batches(32, 32, 256, 3, 8, seed=5)
    rows.append(run(wl, val, 100, args.repeats, None))
    print(rows[-1], flush=True)
    if args.smollm2:
        wl = smollm2(n=32, max_length=48, batch_size=4)
        val = [
            {k: v[i : i + 4] for k, v in wl.test.items()}
            for i in range(0, len(wl.test["labels"]), 4)
        ]
        rows.append(run(wl, val, 100, 1, upstream_points=2))
        print(rows[-1], flush=True)
    meta = {
        "command": "python benchmarks/bench_gridsearch.py"
        + (" --smollm2" if args.smollm2 else ""),
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "threads": args.threads,
    }
    result = {"meta": meta, "rows": rows}
    lines = [
        f"`{meta['command']}` ({meta['machine']}, torch {meta['torch']}, "
        f"{args.threads} threads, {meta['date']})",
        "",
        "| workload | val examples | grid | ours (s) | laplace-torch (s) | speed-up "
        "| prior: ours / laplace-torch / brute force |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ref = (
            f"{r['laplace_torch_s']:.3g}"
            if r["laplace_torch_points_timed"] == r["grid_size"]
            else f"{r['laplace_torch_s']:.3g} (from {r['laplace_torch_points_timed']} "
            "points)"
        )
        lt = r["laplace_torch_prior"]
        lines.append(
            f"| {r['workload']} | {r['n_val']} | {r['grid_size']} | {r['ours_s']:.3g} "
            f"| {ref} | {r['speedup']:.0f}x | {r['ours_prior']:.3g} / "
            f"{'-' if lt is None else f'{lt:.3g}'} / {r['brute_force_prior']:.3g} |"
        )
    write_results(args.output, "gridsearch", result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
