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
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import laplace_lora_backend  # noqa: F401
from benchmarks.suite.contenders import CONTENDERS, REFERENCE, contender
from benchmarks.suite.measure import (
    PeakMemory,
    error_message,
    peak_rss_bytes,
    rss_bytes,
    run_limited,
    run_meta,
    timed_ratio,
)
from benchmarks.suite.workloads import (
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
def model_cell(
    make, name: str, repeats: int, limit_s: float, device: str = "cpu"
) -> dict:
    """Every measurement of one contender on one workload.

    Runs in a fresh child process in full mode (so peak memory is this
    cell's). Each stage (fit, marglik, predictive) times a warm-up and up to
    `repeats` runs within `limit_s`; a stage that fails is reported with its
    error and the stages before it are kept.

    Returns
    -------
    dict
        The cell: ``"contender"``, the fit, marglik and predictive timings,
        memory and factor size, the log marginal likelihood and the
        predictive probabilities, or ``"error"`` / ``"marglik_error"`` /
        ``"predict_error"`` for the stage that failed.
    """
    cell: dict[str, Any] = {"contender": name}
    wl = make().to(device)
    stage = "error"  # building or fitting failed: the whole cell is refused
    try:
        la = contender(name).build(wl.model)
        loader = Loader(wl.train)
        with PeakMemory() as base_mem:
            _fwd_bwd(wl)
        with PeakMemory() as fit_mem:
            t0 = time.perf_counter()
            la.fit(loader)  # warm-up: memory, refusal check, number of runs
            first = time.perf_counter() - t0
        fit = timed_ratio(
            lambda: la.fit(loader), lambda: _fwd_bwd(wl), repeats, limit_s, first
        )
        cell.update(
            runs=fit.runs,
            fit_s=fit.seconds,
            fit_x=fit.ratio,
            fwd_bwd_s=fit.base_seconds,
            fwd_bwd_rss_mib=base_mem.rss_bytes / MIB,
            fit_rss_mib=fit_mem.rss_bytes / MIB,
            fit_cuda_mib=fit_mem.cuda_bytes / MIB,
            fwd_bwd_cuda_mib=base_mem.cuda_bytes / MIB,
            factor_mib=_factor_bytes(la) / MIB,
        )
        stage = "marglik_error"

        def tune():
            la.prior_precision = 1.0
            la.optimize_prior_precision(method="marglik", n_steps=20)

        # prior tuning does not run the model: its ratio uses the fit's baseline
        tuned = timed_ratio(tune, lambda: None, repeats, limit_s)
        cell.update(marglik_s=tuned.seconds, marglik_x=tuned.seconds / fit.base_seconds)
        la.prior_precision = 1.0
        cell["lml"] = la.log_marginal_likelihood().item()
        stage = "predict_error"

        def predict():
            return la(wl.test, pred_type="glm", link_approx="probit")

        pred = timed_ratio(predict, lambda: _forward(wl), repeats, limit_s)
        cell.update(predict_s=pred.seconds, predict_x=pred.ratio)
        cell["probs"] = predict().detach().double().cpu().tolist()
    except Exception as exc:  # refused or failed: reported, not dropped
        cell[stage] = error_message(exc)
    return cell


def _agreement(cells: list[dict]) -> None:
    by_name = {c["contender"]: c for c in cells}
    for c in cells:
        ref = by_name.get(REFERENCE.get(c["contender"], ""))
        if ref is None:
            continue
        if "lml" in c and "lml" in ref:
            c["agree_with"] = ref["contender"]
            c["lml_rel_diff"] = abs(c["lml"] - ref["lml"]) / abs(ref["lml"])
        if "probs" in c and "probs" in ref:
            diff = torch.tensor(c["probs"]) - torch.tensor(ref["probs"])
            c["probs_max_diff"] = diff.abs().max().item()
    for c in cells:
        c.pop("probs", None)


def section_models(
    workloads: list,
    repeats: int,
    limit_s: float,
    mem_gib: float,
    isolate: bool,
    device: str = "cpu",
) -> list[dict]:
    """Every contender on every workload.

    With `isolate`, each cell runs in a fresh child process (peak memory is
    then the cell's own; time limit: 4 stages of `limit_s`; address space
    `mem_gib`). Otherwise in this process (the quick smoke test).

    Returns
    -------
    list of dict
        Per workload: ``{"workload", "meta", "cells"}``, the cells with their
        agreement with the reference contender.
    """
    out = []
    for make in workloads:
        wl = make()
        name, meta = wl.name, wl.meta
        del wl
        cells = []
        for c in tqdm(CONTENDERS, desc=name[:40]):
            args = (make, c.name, repeats, limit_s, device)
            if isolate:
                cell = run_limited(
                    model_cell, args, 4 * limit_s, _address_limit(mem_gib, device)
                )
                cell.setdefault("contender", c.name)
            else:
                cell = model_cell(*args)
            cells.append(cell)
        _agreement(cells)
        out.append({"workload": name, "meta": meta, "cells": cells})
    return out


def _address_limit(gib: float, device: str) -> int | None:
    """Child address-space limit; none on CUDA (its driver maps far more).

    Returns
    -------
    int or None
        `gib` in bytes on CPU, None on CUDA.
    """
    return int(gib * 2**30) if torch.device(device).type == "cpu" else None


# ------------------------------------------------------------------ widths
def width_cell(
    name: str, d: int, repeats: int, limit_s: float, device: str = "cpu"
) -> dict:
    """One width-sweep cell (runs in a child process).

    Fit time includes the eigendecomposition (laplace-torch's
    `KronLaplace.fit` decomposes too) and its ratio to a plain
    forward+backward pass; peak RSS is the process's peak minus its RSS
    before the first fit.

    Returns
    -------
    dict
        ``runs``, ``fit_s``, ``fit_x``, ``factor_mib``, ``peak_rss_mib`` and
        ``peak_cuda_mib``.
    """
    wl = wide_layer(d).to(device)
    la = contender(name).build(wl.model)
    loader = Loader(wl.train)
    before = rss_bytes()
    with PeakMemory(sample_rss=False) as mem:  # CUDA only: no thread in the timing
        fit = timed_ratio(
            lambda: la.fit(loader), lambda: _fwd_bwd(wl), repeats, limit_s
        )
    return {
        "runs": fit.runs,
        "fit_s": fit.seconds,
        "fit_x": fit.ratio,
        "factor_mib": _factor_bytes(la) / MIB,
        "peak_rss_mib": (peak_rss_bytes() - before) / MIB,
        "peak_cuda_mib": mem.cuda_bytes / MIB,
    }


WIDTH_CONTENDERS = [
    "ours kron low-rank",
    "ours kron dense",
    "laplace-torch kron CurvlinopsGGN",
    "laplace-torch kron CurvlinopsEF",
    "laplace-torch kron AsdlGGN",
    "laplace-torch kron AsdlEF",
]


def section_widths(
    widths: list[int],
    repeats: int,
    limit_s: float,
    mem_gib: float,
    names: list[str] = WIDTH_CONTENDERS,
    device: str = "cpu",
) -> list[dict]:
    """Fit of one LoRA layer per width, each cell in a limited child process.

    A dense cell is not run when its factor and eigenvectors would not fit in
    `mem_gib`, or when the cubic `eigh` cost extrapolated from the previous
    width exceeds twice the time limit; the reason is reported.

    Returns
    -------
    list of dict
        One row per (width, contender): ``width``, ``contender`` and the
        `width_cell` measurements, or ``error``.
    """
    rows: list[dict] = []
    last: dict[str, dict] = {}
    cells = [(d, name) for d in widths for name in names]
    for d, name in tqdm(cells, desc="width sweep"):
        prev = last.get(name)
        dense = name != "ours kron low-rank"
        need_gib = 4 * d * d * 4 / 2**30  # factor, eigenvectors, 2 temporaries
        if prev is not None and "error" in prev:
            res = {"error": f"not run: failed at width {prev['width']}"}
        elif dense and need_gib > mem_gib:
            res = {"error": f"not run: needs ~{need_gib:.0f} GiB > {mem_gib:g} GiB"}
        elif (
            dense
            and prev is not None
            and (guess := prev["fit_s"] * (d / prev["width"]) ** 3) > 2 * limit_s
        ):
            res = {
                "error": f"not run: ~{guess:.0f} s predicted (cubic in width, "
                f"from {prev['width']}) > 2 x the {limit_s:.0f} s limit"
            }
        else:
            res = run_limited(
                width_cell,
                (name, d, repeats, limit_s, device),
                2 * limit_s,
                _address_limit(mem_gib + 2, device),
            )
        row = {"width": d, "contender": name, **res}
        rows.append(row)
        last[name] = row
    return rows


# ----------------------------------------------------------------- outputs
def _fitted_many_outputs(C: int, device: str = "cpu"):
    from laplace import Laplace

    wl = many_outputs(C).to(device)
    la = Laplace(
        wl.model,
        "classification",
        subset_of_weights="lora",
        hessian_structure="kron",
        center_logits=False,  # laplace-torch's probit: comparable predictives
    )
    la.fit(Loader(wl.train))
    return wl, la


def upstream_predict_cell(
    C: int, repeats: int, limit_s: float, device: str = "cpu"
) -> dict:
    """laplace-torch's GLM predictive on our posterior (child process).

    Returns
    -------
    dict
        ``predict_s``, ``predict_x`` (ratio to a forward pass), ``runs`` and
        the predictive ``probs`` `(batch, C)` as nested lists.
    """
    from laplace import KronLaplace
    from laplace.curvature import CurvlinopsGGN

    wl, ours = _fitted_many_outputs(C, device)
    ref = KronLaplace(wl.model, "classification", backend=CurvlinopsGGN)
    ref.mean, ref.n_data, ref.loss = ours.mean, ours.n_data, ours.loss
    ref.n_outputs = C
    ref.H_facs, ref.H = ours.H_facs, ours.H
    ref.prior_precision = ours.prior_precision

    def predict():
        return ref(wl.test, link_approx="probit")

    t = timed_ratio(predict, lambda: _forward(wl), repeats, limit_s)
    return {
        "predict_s": t.seconds,
        "predict_x": t.ratio,
        "runs": t.runs,
        "probs": predict().double().cpu().tolist(),
    }


def section_outputs(
    classes: list[int],
    repeats: int,
    limit_s: float,
    mem_gib: float,
    device: str = "cpu",
) -> list[dict]:
    """GLM predictive vs outputs: ours here, laplace-torch in a limited child.

    Returns
    -------
    list of dict
        One row per `C`: our time and ratio to a forward pass, and
        laplace-torch's time, ratio, the speed-up and the max difference of
        the probabilities, or ``laplace_torch_error``.
    """
    rows = []
    for C in tqdm(classes, desc="outputs sweep"):
        wl, la = _fitted_many_outputs(C, device)

        def predict(la=la, wl=wl):
            return la(wl.test, link_approx="probit")

        t = timed_ratio(predict, lambda wl=wl: _forward(wl), repeats, limit_s)
        row = {"C": C, "ours_s": t.seconds, "ours_x_forward": t.ratio}
        ref = run_limited(
            upstream_predict_cell,
            (C, repeats, limit_s, device),
            2 * limit_s,
            _address_limit(mem_gib, device),
        )
        if "error" in ref:
            row["laplace_torch_error"] = ref["error"]
        else:
            p_ref = torch.tensor(ref["probs"], dtype=torch.float64)
            row.update(
                laplace_torch_s=ref["predict_s"],
                laplace_torch_x_forward=ref["predict_x"],
                speedup=ref["predict_s"] / t.seconds,
                probs_max_diff=(predict().double().cpu() - p_ref).abs().max().item(),
            )
        rows.append(row)
    return rows


# ------------------------------------------------------------------ report
def fmt_number(v: Any, digits: int = 3) -> str:
    """A table entry: floats to `digits` significant digits, None as "-".

    Returns
    -------
    str
        Floats outside ``[1e-3, 1e5)`` (except 0) in exponent notation; other
        values as `str`.
    """
    if v is None:
        return "-"
    if isinstance(v, float):
        if v == 0 or math.isfinite(v) and 1e-3 <= abs(v) < 1e5:
            return f"{v:.{digits}g}"
        return f"{v:.1e}"
    return str(v)


def md_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """Markdown table lines; the first column left-aligned, the rest right.

    Returns
    -------
    list of str
        The header, the alignment line and one line per row (entries through
        `fmt_number`).
    """
    align = ["---"] + ["---:"] * (len(header) - 1)
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    out += ["| " + " | ".join(fmt_number(v) for v in row) + " |" for row in rows]
    return out


MODEL_COLUMNS = {
    "runs": "runs",
    "fit_s": "fit (s)",
    "fit_x": "fit / fwd+bwd",
    "fit_rss_mib": "fit peak RSS (MiB)",
    "fit_rss_x": "RSS / fwd+bwd",
    "factor_mib": "factors (MiB)",
    "marglik_s": "marglik (s)",
    "marglik_x": "marglik / fwd+bwd",
    "predict_s": "predict (s/batch)",
    "predict_x": "predict / fwd",
    "lml_rel_diff": "lml rel. diff",
    "probs_max_diff": "probs max diff",
}


def _model_rows(cells: list[dict], cuda: bool) -> list[list[Any]]:
    rows = []
    for c in cells:
        if "error" in c:
            rows.append(
                [c["contender"], c["error"]] + [""] * (len(MODEL_COLUMNS) + cuda)
            )
            continue
        c = dict(c)
        if c.get("fwd_bwd_rss_mib"):
            c["fit_rss_x"] = c["fit_rss_mib"] / c["fwd_bwd_rss_mib"]
        notes = "; ".join(
            f"{k.split('_')[0]}: {c[k]}"
            for k in ("marglik_error", "predict_error")
            if k in c
        )
        if c.get("runs") == 0:
            notes = "; ".join(filter(None, ["1 run (over the time budget)", notes]))
        row = [c["contender"]] + [c.get(k) for k in MODEL_COLUMNS]
        if cuda:
            row.append(c.get("fit_cuda_mib"))
        rows.append(row + [notes or ""])
    return rows


def _median_of(cells: list[dict], key: str) -> float | None:
    vals = [c[key] for c in cells if key in c]
    return statistics.median(vals) if vals else None


def targets(result: dict) -> list[dict]:
    """The issue's acceptance targets, evaluated on `result`.

    Returns
    -------
    list of dict
        ``{"target", "measured", "met"}`` (``met`` is None where the section
        or cell needed was not run).
    """
    out = []
    for wl in result.get("models", []):
        if not wl["workload"].startswith("SmolLM2"):
            continue
        for name in ("ours kron EF", "ours kron MC"):
            c = next((c for c in wl["cells"] if c["contender"] == name), {})
            x = c.get("fit_x")
            out.append(
                {
                    "target": f"{name} fit <= 1.1x a forward+backward (SmolLM2)",
                    "measured": f"{x:.2f}x" if x else c.get("error", "not run"),
                    "met": None if x is None else x <= 1.1,
                }
            )
    at = {r["contender"]: r for r in result.get("widths", []) if r["width"] == 4096}
    ours = at.get("ours kron low-rank", {})
    theirs = [
        r for n, r in at.items() if n.startswith("laplace-torch") and "fit_s" in r
    ]
    if "fit_s" in ours and theirs:
        fastest = min(theirs, key=lambda r: r["fit_s"])
        smallest = min(theirs, key=lambda r: r["factor_mib"])
        speed = fastest["fit_s"] / ours["fit_s"]
        size = smallest["factor_mib"] / ours["factor_mib"]
        out += [
            {
                "target": ">= 10x faster fit than the fastest laplace-torch "
                "backend at width 4096",
                "measured": f"{speed:.1f}x (vs {fastest['contender']})",
                "met": speed >= 10,
            },
            {
                "target": ">= 100x smaller factors than laplace-torch at width 4096",
                "measured": f"{size:.0f}x",
                "met": size >= 100,
            },
        ]
    row = next((r for r in result.get("outputs", []) if r["C"] == 1000), None)
    if row is not None:
        if "speedup" in row:
            measured, met = f"{row['speedup']:.0f}x", row["speedup"] >= 50
        else:  # laplace-torch did not finish: a lower bound from the limit
            limit = float(result["meta"]["per-cell limit (s)"])
            bound = limit / row["ours_s"]
            measured = f"> {bound:.0f}x (laplace-torch: {row['laplace_torch_error']})"
            met = bound >= 50
        out.append(
            {
                "target": ">= 50x faster GLM predictive at C = 1000",
                "measured": measured,
                "met": met,
            }
        )
    return out


def to_markdown(result: dict) -> str:
    """The result as Markdown tables (the JSON holds every number).

    Returns
    -------
    str
        The meta data, then the targets, models, width and outputs tables of
        the sections present.
    """
    lines = [f"# laplace-lora bench ({result['meta']['mode']})", ""]
    lines += [f"- {k}: {v}" for k, v in result["meta"].items()]
    if result.get("targets"):
        lines += ["", "## Targets", ""]
        lines += md_table(
            ["target", "measured", "met"],
            [
                [
                    t["target"],
                    t["measured"],
                    {True: "yes", False: "**no**"}.get(t["met"], "-"),
                ]
                for t in result["targets"]
            ],
        )
    for wl in result.get("models", []):
        cells = wl["cells"]
        cuda = any(c.get("fit_cuda_mib") for c in cells)
        lines += [
            "",
            f"## {wl['workload']}",
            "",
            "Plain forward+backward over the training data: "
            f"{fmt_number(_median_of(cells, 'fwd_bwd_s'))} s, peak RSS "
            f"{fmt_number(_median_of(cells, 'fwd_bwd_rss_mib'))} MiB (medians over the "
            + (
                "cells; quick mode runs them in one process, so the memory "
                "columns only show growth). "
                if result["meta"]["mode"] == "quick"
                else "cells, each measured in the cell's own process). "
            )
            + "Times: median of "
            "`runs` after a warm-up; ratios: median of per-run ratios to the "
            "baseline timed alternately.",
            "",
        ]
        header = ["contender"] + list(MODEL_COLUMNS.values())
        header += ["fit peak CUDA (MiB)"] * cuda + ["notes"]
        lines += md_table(header, _model_rows(cells, cuda))
    if result.get("widths"):
        rows = result["widths"]
        cuda = any(r.get("peak_cuda_mib") for r in rows)
        lines += [
            "",
            "## Width sweep (one LoRA layer; fresh process per cell)",
            "",
            "Fit includes the eigendecomposition (laplace-torch's `KronLaplace.fit` "
            "decomposes as well).",
            "",
        ]
        keys = ["runs", "fit_s", "fit_x", "factor_mib", "peak_rss_mib"]
        keys += ["peak_cuda_mib"] * cuda
        lines += md_table(
            ["width", "contender", "runs", "fit (s)", "fit / fwd+bwd"]
            + ["factors (MiB)", "fit peak RSS (MiB)"]
            + ["fit peak CUDA (MiB)"] * cuda,
            [
                [r["width"], r["contender"]]
                + (
                    [r["error"]] + [""] * (len(keys) - 1)
                    if "error" in r
                    else [r[k] for k in keys]
                )
                for r in rows
            ],
        )
    if result.get("outputs"):
        lines += [
            "",
            "## GLM predictive vs number of outputs C (same posterior)",
            "",
        ]
        lines += md_table(
            [
                "C",
                "ours (s/batch)",
                "ours / forward",
                "laplace-torch (s/batch)",
                "laplace-torch / forward",
                "speed-up",
                "probs max diff",
            ],
            [
                [
                    r["C"],
                    r["ours_s"],
                    r["ours_x_forward"],
                    r.get("laplace_torch_error") or r.get("laplace_torch_s"),
                    r.get("laplace_torch_x_forward"),
                    r.get("speedup"),
                    r.get("probs_max_diff"),
                ]
                for r in result["outputs"]
            ],
        )
    return "\n".join(lines) + "\n"


def plot_widths(rows: list[dict], path: Path) -> None:
    """Fit time, factor storage and peak RSS vs width (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("fit_s", "fit time (s)"),
        ("factor_mib", "factor storage (MiB)"),
        ("peak_rss_mib", "fit peak RSS (MiB)"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(14, 4))
    for name in WIDTH_CONTENDERS:
        ok = [r for r in rows if r["contender"] == name and "error" not in r]
        if not ok:
            continue
        ws = [r["width"] for r in ok]
        style = "o-" if name.startswith("ours") else "s--"
        for ax, (key, _) in zip(axes, panels, strict=True):
            ax.loglog(ws, [max(r[key], 1e-3) for r in ok], style, label=name)
    for ax, (_, label) in zip(axes, panels, strict=True):
        ax.set(xlabel="LoRA layer width", ylabel=label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
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
    command: str | None = None,
    device: str = "cpu",
) -> dict:
    """Run the sections; write ``bench[_quick][_gpu].{md,json}`` and the plot.

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
        Time budget of each timed stage of a cell: after a timed warm-up, only
        as many of the `repeats` runs as fit in it are made (0: the warm-up's
        time is reported, with ``runs = 0``). Child processes are killed after
        a multiple of it (the cell is then reported as over the limit).
    mem_gib : float
        Address-space limit of child processes; dense cells predicted to need
        more are reported instead of run.
    threads : int
        torch threads.
    command : str, optional
        The command line, recorded in the results.
    device : str
        Where models and data live (``"cpu"``, ``"cuda"``); on CUDA, peak
        memory is also reported as torch's peak allocation, and child
        processes get no address-space limit.

    Returns
    -------
    dict
        ``"meta"``, one entry per section run and ``"targets"`` (as written to
        the JSON file).

    Raises
    ------
    ValueError
        If `device` is CUDA and torch sees no CUDA device.
    """
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but torch sees no CUDA device.")
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
        width_names = WIDTH_CONTENDERS[:3]  # ours low-rank, dense; one upstream
    else:
        workloads = [partial(tiny_lm, "llama"), partial(tiny_lm, "gpt2")]
        widths, classes = [256, 1024, 4096, 16384, 65536], [2, 8, 100, 1000]
        width_names = WIDTH_CONTENDERS
    if smollm2_workload:
        workloads.append(smollm2)
    command = command or "laplace-lora bench " + " ".join(sys.argv[2:])
    result: dict[str, Any] = {
        "meta": {
            "mode": "quick" if quick else "full",
            **run_meta(device, threads, repeats, limit_s, mem_gib, command),
        }
    }
    if "models" in sections:
        result["models"] = section_models(
            workloads, repeats, limit_s, mem_gib, isolate=not quick, device=device
        )
    if "widths" in sections:
        result["widths"] = section_widths(
            widths, repeats, limit_s, mem_gib, width_names, device
        )
    if "outputs" in sections:
        result["outputs"] = section_outputs(classes, repeats, limit_s, mem_gib, device)
    result["targets"] = targets(result)
    result["meta"]["seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    name = ("bench_quick" if quick else "bench") + (
        "_gpu" if torch.device(device).type == "cuda" else ""
    )
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    (out / f"{name}.md").write_text(to_markdown(result))
    if result.get("widths"):
        plot_widths(result["widths"], out / f"{name}_widths.png")
    print(to_markdown(result))
    return result
