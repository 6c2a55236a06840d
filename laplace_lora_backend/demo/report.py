"""Summary over seeds, the Markdown table and the reliability diagram."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch

from laplace_lora_backend.demo.config import METHODS
from laplace_lora_backend.demo.metrics import reliability_bins

__all__ = ["markdown_table", "reliability_plot", "summarize"]


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean and standard deviation over seeds of every metric.

    Returns
    -------
    dict[str, dict[str, float]]
        Method -> ``{metric, metric + "_std"}`` (std 0 for one seed).
    """
    out = {}
    for m in METHODS:
        out[m] = {}
        for k in ("acc", "ece", "nll", "brier"):
            vals = [r["metrics"][m][k] for r in runs]
            out[m][k] = statistics.fmean(vals)
            out[m][f"{k}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return out


def markdown_table(
    summary, n_seeds: int, title: str, methods: list[str] = METHODS
) -> str:
    """The paper's table: ACC / ECE / NLL / Brier per method.

    ACC and ECE in percent; mean +- std over seeds.

    Returns
    -------
    str
        Markdown: a heading with `title` and one row per method.
    """
    lines = [
        f"### {title}",
        "",
        "| method | ACC (%) | ECE (%) | NLL | Brier |",
        "|---|---:|---:|---:|---:|",
    ]
    for m in methods:
        s = summary[m]

        def cell(k, scale=1.0, digits=3, s=s):
            v = f"{s[k] * scale:.{digits}f}"
            return v + (f" ± {s[k + '_std'] * scale:.{digits}f}" if n_seeds > 1 else "")

        lines.append(
            f"| {m} | {cell('acc', 100, 1)} | {cell('ece', 100, 1)} | "
            f"{cell('nll')} | {cell('brier')} |"
        )
    return "\n".join(lines)


def reliability_plot(
    run: dict[str, Any], path: Path, title: str, methods: list[str] = METHODS
) -> None:
    """Reliability diagram of one run, one panel per method (PNG at `path`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = torch.tensor(run["labels"])
    fig, axes = plt.subplots(
        1, len(methods), figsize=(3 * len(methods), 3.2), sharey=True
    )
    centers = (torch.arange(15) + 0.5) / 15
    for ax, m in zip(axes, methods, strict=True):
        conf, acc, count = reliability_bins(torch.tensor(run["probs"][m]), labels)
        ok = count > 0
        ax.bar(
            centers[ok],
            acc[ok],
            width=1 / 15,
            edgecolor="k",
            alpha=0.7,
            label="accuracy",
        )
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.plot(conf[ok], acc[ok], "o", color="C3", ms=3, label="(conf, acc)")
        ece = run["metrics"][m]["ece"]
        ax.set(
            title=f"{m}  ECE {100 * ece:.1f}%",
            xlabel="confidence",
            xlim=(0, 1),
            ylim=(0, 1),
        )
    axes[0].set_ylabel("accuracy")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
