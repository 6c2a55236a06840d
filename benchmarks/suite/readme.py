"""The README's benchmark summary, rendered from the committed JSON.

The README holds the block between ``<!-- bench:begin -->`` and
``<!-- bench:end -->``; `render` makes it from ``bench.json`` and a test checks
that the two agree. After ``laplace-lora bench`` rewrite it with::

    python -m benchmarks.suite.readme [bench.json] [README.md]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks.suite.suite import fmt_number, md_table

__all__ = ["BEGIN", "END", "render", "update_readme"]

BEGIN = "<!-- bench:begin (generated from benchmarks/results/bench.json) -->"
END = "<!-- bench:end -->"

_MET = {True: "yes", False: "**no**", None: "-"}


def _predict(c: dict, mem_gib: float) -> object:
    err = c.get("predict_error", "")
    if "allocate memory" in err:
        return f"out of memory ({mem_gib:g} GiB limit)"
    return c.get("predict_x") if not err else "failed: " + err[:60]


def _models(cells: list[dict], mem_gib: float) -> list[str]:
    rows = []
    for c in cells:
        if "error" in c:
            how = "refused" if c["error"].startswith("ValueError") else "failed"
            rows.append([c["contender"], f"{how}: {c['error'][:60]}", "", "", ""])
            continue
        rows.append(
            [
                c["contender"],
                c.get("fit_x"),
                c.get("factor_mib"),
                _predict(c, mem_gib),
                c.get("lml_rel_diff"),
            ]
        )
    return md_table(
        [
            "contender",
            "fit / fwd+bwd",
            "factors (MiB)",
            "predict / fwd",
            "lml rel. diff vs ours dense (EF rows: vs ours EF)",
        ],
        rows,
    )


def render(result: dict, json_path: str = "benchmarks/results/bench.json") -> str:
    """The README block (without the markers) for a suite `result`.

    Returns
    -------
    str
        Markdown: the targets table, the SmolLM2 Kronecker contenders, the
        width-4096 layer and the predictive-vs-outputs tables (those present).
    """
    meta = result["meta"]
    md_path = str(Path(json_path).with_suffix(".md"))
    lines = [
        f"`{meta['command']}` on {meta['machine']}, torch {meta['torch']}, "
        f"{meta['threads']} thread(s), {meta['seconds'] / 60:.0f} min "
        f"([all tables]({md_path}), [JSON]({json_path})).",
        "",
    ]
    lines += md_table(
        ["target", "measured", "met"],
        [[t["target"], t["measured"], _MET[t["met"]]] for t in result["targets"]],
    )
    for wl in result.get("models", []):
        if wl["workload"].startswith("SmolLM2"):
            lines += ["", f"**{wl['workload']}** (Kronecker contenders):", ""]
            lines += _models(
                [c for c in wl["cells"] if " diag" not in c["contender"]],
                meta["per-cell memory (GiB)"],
            )
    at = [r for r in result.get("widths", []) if r["width"] == 4096]
    if at:
        lines += ["", "**One LoRA layer of width 4096** (fit includes `eigh`):", ""]
        lines += md_table(
            ["contender", "fit (s)", "factors (MiB)", "fit peak RSS (MiB)"],
            [
                [r["contender"], r["error"], "", ""]
                if "error" in r
                else [r["contender"], r["fit_s"], r["factor_mib"], r["peak_rss_mib"]]
                for r in at
            ],
        )
    if result.get("outputs"):
        lines += ["", "**GLM probit predictive vs outputs C** (same posterior):", ""]
        lines += md_table(
            ["C", "ours (s)", "laplace-torch (s)", "speed-up"],
            [
                [
                    r["C"],
                    r["ours_s"],
                    r.get("laplace_torch_error")
                    or fmt_number(r.get("laplace_torch_s")),
                    r.get("speedup"),
                ]
                for r in result["outputs"]
            ],
        )
    return "\n".join(lines) + "\n"


def update_readme(json_path: str, readme: str = "README.md") -> None:
    """Replace the README's generated block with `render` of `json_path`.

    Raises
    ------
    ValueError
        If `readme` lacks the `BEGIN` or the `END` marker.
    """
    text = Path(readme).read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{readme} has no {BEGIN!r} ... {END!r} block to replace.")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    result = json.loads(Path(json_path).read_text())
    block = render(result, json_path)
    Path(readme).write_text(f"{head}{BEGIN}\n{block}{END}{tail}")


if __name__ == "__main__":
    update_readme(*(sys.argv[1:] or ["benchmarks/results/bench.json"]))
