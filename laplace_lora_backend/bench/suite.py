"""The benchmark suite behind ``laplace-lora bench``.

Sections (all in one run, so machine drift cancels in the ratios):

``models``
    Tiny random-init Llama and GPT-2 PEFT models (and SmolLM2-135M with LoRA on
    q, v and the trimmed lm_head on 64 drug reviews, with ``--smollm2``): every
    contender's fit time and its ratio to one plain forward+backward pass over
    the same data, peak memory (sampled RSS; CUDA allocations on GPU), factor
    storage, marglik prior tuning time, GLM probit predictive time per batch
    and its ratio to a forward pass, and agreement with ours (relative
    difference of the log marginal likelihood, max difference of the
    predictive probabilities) where both compute the same quantity.
``widths``
    One LoRA layer of width 256 ... 65536: fit time, factor storage and peak
    RSS of ours (low-rank and dense) and laplace-torch's Kron + CurvlinopsGGN,
    each cell in a fresh child process with a time and memory limit.
``outputs``
    GLM predictive with C in {2, 8, 100, 1000} answer tokens: ours vs
    laplace-torch's own GLM path on the same posterior (child process, limits).

Cells that fail, are refused, or exceed a limit are reported with the reason.
Times are medians over `repeats` runs after a warm-up.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from laplace_lora_backend.bench.contenders import CONTENDERS, REFERENCE
from laplace_lora_backend.bench.measure import (
    PeakMemory,
    error_message,
    peak_rss_bytes,
    rss_bytes,
    run_limited,
    timed,
    timed_ratio,
)
from laplace_lora_backend.bench.workloads import (
    Loader,
    Workload,
    many_outputs,
    smollm2,
    tiny_lm,
    wide_layer,
)

__all__ = ["run_suite"]

MIB = 2**20


def _factor_bytes(la: Any) -> int:
    H = getattr(la, "H_facs", None)
    if H is None:
        return la.H.numel() * la.H.element_size()
    if hasattr(H, "factor_bytes"):
        return H.factor_bytes()
    return sum(F.numel() * F.element_size() for b in H.kfacs for F in b)


def _fwd_bwd(wl: Workload) -> None:
    lossfunc = torch.nn.CrossEntropyLoss(reduction="sum")
    for b in wl.train:
        lossfunc(wl.model(b), b["labels"]).backward()
    wl.model.zero_grad(set_to_none=True)


@torch.no_grad()
def _forward(wl: Workload) -> None:
    wl.model(wl.test)


# ------------------------------------------------------------------ models
def model_cell(wl: Workload, contender, repeats: int, limit_s: float) -> dict:
    """Every measurement of one contender on one workload."""
    cell: dict[str, Any] = {"contender": contender.name}
    try:
        la = contender.build(wl.model)
        loader = Loader(wl.train)
        t0 = time.perf_counter()
        la.fit(loader)  # warm-up (and the limit check)
        first = time.perf_counter() - t0
        if first > limit_s:
            cell.update(fit_s=first, note=f"1 run: over the {limit_s:.0f} s limit")
            n_rep = 0
        else:
            n_rep = repeats
            cell["fit_s"], cell["fit_x"] = timed_ratio(
                lambda: la.fit(loader), lambda: _fwd_bwd(wl), repeats
            )
        with PeakMemory() as mem:
            la.fit(loader)
        cell.update(
            peak_rss_mib=mem.rss_bytes / MIB,
            peak_cuda_mib=mem.cuda_bytes / MIB,
            factor_mib=_factor_bytes(la) / MIB,
        )

        def tune():
            la.prior_precision = 1.0
            la.optimize_prior_precision(method="marglik", n_steps=20)

        cell["marglik_s"] = statistics.median(timed(tune, max(n_rep, 1), warmup=0))
        la.prior_precision = 1.0

        def predict():
            return la(wl.test, pred_type="glm", link_approx="probit")

        if n_rep:
            cell["predict_s"], cell["predict_x"] = timed_ratio(
                predict, lambda: _forward(wl), repeats
            )
        else:
            cell["predict_s"] = statistics.median(timed(predict, 1, warmup=0))
        cell["lml"] = la.log_marginal_likelihood().item()
        cell["probs"] = predict().detach().double()
    except Exception as exc:  # refused or failed: reported, not dropped
        cell["error"] = error_message(exc)
    return cell


def _agreement(cells: list[dict]) -> None:
    by_name = {c["contender"]: c for c in cells}
    for c in cells:
        ref = by_name.get(REFERENCE.get(c["contender"], ""))
        if ref is None or "lml" not in c or "lml" not in ref:
            continue
        c["agree_with"] = ref["contender"]
        c["lml_rel_diff"] = abs(c["lml"] - ref["lml"]) / abs(ref["lml"])
        c["probs_max_diff"] = (c["probs"] - ref["probs"]).abs().max().item()
    for c in cells:
        c.pop("probs", None)


def section_models(
    workloads: list, repeats: int, limit_s: float, memory_in_child: bool
) -> list[dict]:
    """Every contender on every workload.

    With `memory_in_child`, each cell's fit memory is also measured in a
    fresh child process (`fit_peak_rss_mib`); the in-process sampled value
    (`peak_rss_mib`) is affected by memory freed by earlier cells.
    """
    out = []
    for make in workloads:
        wl = make()
        cells = []
        for contender in tqdm(CONTENDERS, desc=wl.name[:40]):
            cell = model_cell(wl, contender, repeats, limit_s)
            if memory_in_child and "error" not in cell:
                cell.update(
                    run_limited(fit_memory_cell, (make, contender.name), limit_s)
                )
            cells.append(cell)
        _agreement(cells)
        out.append({"workload": wl.name, "meta": wl.meta, "cells": cells})
        del wl
    return out


# ------------------------------------------------------------------ widths
def fit_memory_cell(make, contender_name: str) -> dict:
    """Peak RSS added by one fit, in a fresh child process.

    The model and data are built first; the result is the process's peak RSS
    after the fit minus its RSS before it.
    """
    contender = next(c for c in CONTENDERS if c.name == contender_name)
    wl = make()
    la = contender.build(wl.model)
    before = rss_bytes()
    la.fit(Loader(wl.train))
    return {"fit_peak_rss_mib": (peak_rss_bytes() - before) / MIB}


def width_cell(contender_name: str, d: int, repeats: int) -> dict:
    """One width-sweep cell (runs in a child process)."""
    contender = next(c for c in CONTENDERS if c.name == contender_name)
    wl = wide_layer(d)
    la = contender.build(wl.model)
    loader = Loader(wl.train)
    before = rss_bytes()
    times = timed(lambda: la.fit(loader), repeats)
    return {
        "fit_s": statistics.median(times),
        "factor_mib": _factor_bytes(la) / MIB,
        "peak_rss_mib": (peak_rss_bytes() - before) / MIB,
    }


WIDTH_CONTENDERS = [
    "ours kron low-rank",
    "ours kron dense",
    "laplace-torch kron CurvlinopsGGN",
]


def section_widths(
    widths: list[int], repeats: int, limit_s: float, mem_gib: float
) -> list[dict]:
    rows = []
    cells = [(d, name) for d in widths for name in WIDTH_CONTENDERS]
    for d, name in tqdm(cells, desc="width sweep"):
        dense = name != "ours kron low-rank"
        need_gib = 4 * d * d * 4 / 2**30  # factor, eigenvectors, 2 temporaries
        if dense and need_gib > mem_gib:
            res = {"error": f"needs ~{need_gib:.0f} GiB > the {mem_gib:g} GiB limit"}
        else:
            res = run_limited(
                width_cell, (name, d, repeats), limit_s, int(mem_gib * 2**30) + 2**31
            )
        rows.append({"width": d, "contender": name, **res})
    return rows


# ----------------------------------------------------------------- outputs
def _fitted_many_outputs(C: int):
    from laplace import Laplace

    import laplace_lora_backend  # noqa: F401

    wl = many_outputs(C)
    la = Laplace(
        wl.model, "classification", subset_of_weights="lora", hessian_structure="kron"
    )
    la.fit(Loader(wl.train))
    return wl, la


def upstream_predict_cell(C: int, repeats: int) -> dict:
    """laplace-torch's GLM predictive on our posterior (child process)."""
    from laplace import KronLaplace
    from laplace.curvature import CurvlinopsGGN

    wl, ours = _fitted_many_outputs(C)
    ref = KronLaplace(wl.model, "classification", backend=CurvlinopsGGN)
    ref.mean, ref.n_data, ref.loss = ours.mean, ours.n_data, ours.loss
    ref.n_outputs = C
    ref.H_facs, ref.H = ours.H_facs, ours.H
    ref.prior_precision = ours.prior_precision
    times = timed(lambda: ref(wl.test, link_approx="probit"), repeats)
    probs = ref(wl.test, link_approx="probit").double()
    return {
        "predict_s": statistics.median(times),
        "peak_rss_mib": peak_rss_bytes() / MIB,
        "probs": probs.tolist(),
    }


def section_outputs(
    classes: list[int], repeats: int, limit_s: float, mem_gib: float
) -> list[dict]:
    rows = []
    for C in tqdm(classes, desc="outputs sweep"):
        wl, la = _fitted_many_outputs(C)

        def predict(la=la, wl=wl):
            return la(wl.test, link_approx="probit")

        t, ratio = timed_ratio(predict, lambda wl=wl: _forward(wl), repeats)
        row = {"C": C, "ours_s": t, "ours_x_forward": ratio}
        ref = run_limited(
            upstream_predict_cell, (C, repeats), limit_s, int(mem_gib * 2**30)
        )
        if "error" in ref:
            row["laplace_torch_error"] = ref["error"]
        else:
            p_ref = torch.tensor(ref["probs"], dtype=torch.float64)
            row.update(
                laplace_torch_s=ref["predict_s"],
                speedup=ref["predict_s"] / t,
                probs_max_diff=(predict().double() - p_ref).abs().max().item(),
            )
        rows.append(row)
    return rows


# ------------------------------------------------------------------ report
def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v == 0 or math.isfinite(v) and 1e-3 <= abs(v) < 1e5:
            return f"{v:.{digits}g}"
        return f"{v:.1e}"
    return str(v)


def rss_key(cell: dict) -> str:
    """Child-process fit memory where measured, else the in-process sample."""
    return "fit_peak_rss_mib" if "fit_peak_rss_mib" in cell else "peak_rss_mib"


def to_markdown(result: dict) -> str:
    lines = [f"# laplace-lora bench ({result['meta']['mode']})", ""]
    lines += [f"- {k}: {v}" for k, v in result["meta"].items()]
    for wl in result.get("models", []):
        lines += [
            "",
            f"## {wl['workload']}",
            "",
            "| contender | fit (s) | fit / fwd+bwd | fit peak RSS (MiB) "
            "| factors (MiB) | marglik (s) | predict (s/batch) | predict / fwd "
            "| lml rel. diff | probs max diff |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for c in wl["cells"]:
            if "error" in c:
                lines.append(f"| {c['contender']} | {c['error']} |||||||||")
                continue
            lines.append(
                "| "
                + " | ".join(
                    [c["contender"]]
                    + [
                        _fmt(c.get(k))
                        for k in (
                            "fit_s",
                            "fit_x",
                            "fit_peak_rss_mib"
                            if "fit_peak_rss_mib" in c
                            else "peak_rss_mib",
                            "factor_mib",
                            "marglik_s",
                            "predict_s",
                            "predict_x",
                            "lml_rel_diff",
                            "probs_max_diff",
                        )
                    ]
                )
                + " |"
            )
    if result.get("widths"):
        lines += [
            "",
            "## Width sweep (one LoRA layer; fresh process per cell)",
            "",
            "| width | contender | fit (s) | factors (MiB) | fit peak RSS (MiB) |",
            "|---:|---|---:|---:|---:|",
        ]
        for r in result["widths"]:
            if "error" in r:
                lines.append(f"| {r['width']} | {r['contender']} | {r['error']} |||")
            else:
                lines.append(
                    f"| {r['width']} | {r['contender']} | {_fmt(r['fit_s'])} | "
                    f"{_fmt(r['factor_mib'])} | {_fmt(r['peak_rss_mib'])} |"
                )
    if result.get("outputs"):
        lines += [
            "",
            "## GLM predictive vs number of outputs C (same posterior)",
            "",
            "| C | ours (s/batch) | ours / forward | laplace-torch (s/batch) "
            "| speed-up | probs max diff |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for r in result["outputs"]:
            lt = r.get("laplace_torch_error") or _fmt(r.get("laplace_torch_s"))
            lines.append(
                f"| {r['C']} | {_fmt(r['ours_s'])} | {_fmt(r['ours_x_forward'])} | "
                f"{lt} | {_fmt(r.get('speedup'))} | {_fmt(r.get('probs_max_diff'))} |"
            )
    return "\n".join(lines) + "\n"


def plot_widths(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name in WIDTH_CONTENDERS:
        ok = [r for r in rows if r["contender"] == name and "error" not in r]
        if not ok:
            continue
        ws = [r["width"] for r in ok]
        axes[0].loglog(ws, [r["fit_s"] for r in ok], "o-", label=name)
        axes[1].loglog(ws, [r["factor_mib"] for r in ok], "o-", label=name)
    axes[0].set(xlabel="LoRA layer width", ylabel="fit time (s)")
    axes[1].set(xlabel="LoRA layer width", ylabel="factor storage (MiB)")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------- run
def run_suite(
    output: str = "benchmarks/results",
    quick: bool = False,
    smollm2_workload: bool = False,
    sections: tuple[str, ...] = ("models", "widths", "outputs"),
    repeats: int | None = None,
    limit_s: float = 600.0,
    mem_gib: float = 16.0,
    threads: int = 1,
) -> dict:
    """Run the sections and write ``bench[_quick].{md,json}`` and the plot.

    Parameters
    ----------
    output : str
        Folder for the results.
    quick : bool
        Small sizes for a smoke test (minutes on a CPU).
    smollm2_workload : bool
        Add SmolLM2-135M to the ``models`` section (loads the GGUF package).
    sections : tuple of str
        Subset of ``("models", "widths", "outputs")``.
    repeats : int, optional
        Timed runs per cell after a warm-up (default 3; quick: 2).
    limit_s : float
        Per-cell time limit (child processes are killed; in-process cells
        report a single run above it).
    mem_gib : float
        Address-space limit of child processes; dense cells predicted to need
        more are reported instead of run.
    threads : int
        torch threads.
    """
    torch.set_num_threads(threads)
    repeats = repeats or (2 if quick else 3)
    t0 = time.perf_counter()
    if quick:
        small = dict(hidden=64, layers=2, n=16, tokens=32)
        workloads = [
            partial(tiny_lm, "llama", **small),
            partial(tiny_lm, "gpt2", **small),
        ]
        widths, classes, limit_s = [256, 1024], [2, 8], min(limit_s, 120.0)
    else:
        workloads = [partial(tiny_lm, "llama"), partial(tiny_lm, "gpt2")]
        widths, classes = [256, 1024, 4096, 16384, 65536], [2, 8, 100, 1000]
    if smollm2_workload:
        workloads.append(smollm2)
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    result: dict[str, Any] = {
        "meta": {
            "mode": "quick" if quick else "full",
            "machine": f"{platform.machine()}, {os.cpu_count()} cores{gpu}",
            "torch": torch.__version__,
            "threads": threads,
            "repeats": repeats,
            "per-cell limits": f"{limit_s:.0f} s, {mem_gib:g} GiB",
            "command": "laplace-lora bench " + " ".join(sys.argv[2:]),
        }
    }
    if "models" in sections:
        result["models"] = section_models(
            workloads, repeats, limit_s, memory_in_child=not quick
        )
    if "widths" in sections:
        result["widths"] = section_widths(widths, repeats, limit_s, mem_gib)
    if "outputs" in sections:
        result["outputs"] = section_outputs(classes, repeats, limit_s, mem_gib)
    result["meta"]["seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    name = "bench_quick" if quick else "bench"
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    (out / f"{name}.md").write_text(to_markdown(result))
    if result.get("widths"):
        plot_widths(result["widths"], out / f"{name}_widths.png")
    print(to_markdown(result))
    return result
