"""`laplace-lora calibrate`: does Laplace-LoRA help beyond the demo's case.

A battery of cases on SmolLM2-135M with real data, varying the data set, the
LoRA placement and the training size. Each case is fine-tuned (MAP) per seed,
then compared on its test split, with the library's defaults only:

- ``MAP``: the fine-tuned softmax; ``TS``: temperature scaling (validation);
- ``LA``: ``Laplace(model, "classification", subset_of_weights="lora",
  hessian_structure="kron")``, ``fit``, ``optimize_prior_precision()``,
  ``la(x)`` (no validation data);
- ``LA-auto``: the same with ``optimize_prior_precision(method="auto",
  val_loader=val)``;
- ``LLLA``: defaults over the last layer's LoRA weights (``lm_head`` if it
  has LoRA, else the last transformer block's); ``LA-diag``: diagonal.

Ablations from the same fitted posterior and cached Jacobians (for the
README's comparison): ``LA-notrust`` (the LoRA prior without the trust
region, `laplace_lora_backend.trust_region`), ``LA-scalar`` (laplace-torch's
default prior: one plain marglik precision) and ``LA-rawprobit`` (the
same with laplace-torch's probit, ``center_logits=False``: laplace-torch's
defaults), ``LA-mc`` and
``LA-bridge`` (other links), ``LA-layerwise`` (one marglik precision per
tensor), ``LA-AB`` (one for all `lora_A`, one for all `lora_B`), and
``LA-reduce`` (a second fit with K-FAC ``"reduce"``: one sample per sequence
instead of per token). Every Laplace method reports ``flipped``, the fraction
of test examples whose predicted class differs from MAP's.

Every run is written to ``runs/<case>_s<seed>.json`` as soon as it is done
and skipped when it exists, so the battery can be resumed and split over
processes (``--shard i/n``); ``--aggregate`` writes the summary (JSON,
Markdown, PNG) from the run files.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from laplace_lora_backend.curvature.discovery import lora_layer_names
from laplace_lora_backend.demo import (
    DemoConfig,
    build_model,
    fit_temperature,
    make_splits,
)
from laplace_lora_backend.demo.data import load_dataset
from laplace_lora_backend.demo.finetune import predict_logits, train_map
from laplace_lora_backend.demo.metrics import classification_metrics
from laplace_lora_backend.glm import jacobian_batches
from laplace_lora_backend.prior_groups import marglik_groups

__all__ = [
    "CASES",
    "BatteryConfig",
    "Case",
    "aggregate",
    "readme_block",
    "run_battery",
    "update_readme",
]

METRICS = ("acc", "ece", "nll", "brier")
METHODS = ["MAP", "TS", "LLLA", "LA", "LA-auto", "LA-diag"]
ABLATIONS = [
    "LA-notrust",
    "LA-scalar",
    "LA-rawprobit",
    "LA-mc",
    "LA-bridge",
    "LA-layerwise",
    "LA-AB",
    "LA-reduce",
]


@dataclass(frozen=True)
class Case:
    """One battery case: data set, LoRA placement, training size."""

    dataset: str
    targets: tuple[str, ...]
    n_train: int

    @property
    def name(self) -> str:
        """E.g. ``drugreview-qv-128``."""
        short = "".join(
            "head" if t == "lm_head" else t.removesuffix("_proj") for t in self.targets
        )
        return f"{self.dataset}-{short}-{self.n_train}"


QV = ("q_proj", "v_proj")
KO = ("k_proj", "o_proj")
QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
QV_HEAD = ("q_proj", "v_proj", "lm_head")

CASES = [
    Case("drugreview", QV, 64),
    Case("drugreview", KO, 128),
    Case("drugreview", QKVO, 192),
    Case("drugreview", QV_HEAD, 128),
    Case("bbcnews", QV, 128),
    Case("bbcnews", KO, 64),
    Case("bbcnews", QKVO, 128),
    Case("bbcnews", QV_HEAD, 192),
]


@dataclass
class BatteryConfig:
    """Settings shared by every case (recorded in the JSON)."""

    model: str = "smollm2"
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    n_val: int = 64
    n_test: int = 150
    max_length: int = 40
    batch_size: int = 8
    epochs: int = 6
    lr: float = 2e-3
    weight_decay: float = 0.01
    lora_dropout: float = 0.1
    threads: int = 1
    output: str = "benchmarks/results/calibration"


def _demo_config(cfg: BatteryConfig, case: Case) -> DemoConfig:
    steps = math.ceil(case.n_train / cfg.batch_size) * cfg.epochs
    return DemoConfig(
        dataset=case.dataset,
        model=cfg.model,
        n_train=case.n_train,
        n_val=cfg.n_val,
        n_test=cfg.n_test,
        max_length=cfg.max_length,
        batch_size=cfg.batch_size,
        steps=steps,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(case.targets),
    )


def build_case_model(cfg: BatteryConfig, case: Case, data, seed: int):
    """LoRA answer-token classifier with the case's placement (the demo's).

    Returns
    -------
    tuple[AnswerTokenClassifier, tokenizer]
    """
    return build_model(_demo_config(cfg, case), data, seed)


def last_layer_modules(model) -> list[str] | str:
    """LoRA modules of the last layer (a `lora_modules` value).

    ``lm_head`` if it has LoRA, else the LoRA layers of the last transformer
    block (a regex).

    Returns
    -------
    list[str] or str
    """
    names = lora_layer_names(model)
    if any(n.endswith("lm_head") for n in names):
        return ["lm_head"]
    blocks = [int(m.group(1)) for n in names if (m := re.search(r"\.(\d+)\.", n))]
    return rf"\.{max(blocks)}\."


def _evaluate(la, batches, labels, map_pred, **kwargs) -> dict[str, float]:
    probs = torch.cat([la(jb, **kwargs) for jb, _ in batches])
    metrics = classification_metrics(probs, labels)
    metrics["flipped"] = float((probs.argmax(-1) != map_pred).double().mean())
    return metrics


# Laplace objects of a run: name -> (hessian_structure, last layer only, backend_kwargs)
POSTERIORS = {
    "LA": ("kron", False, {}),
    "LA-reduce": ("kron", False, {"kfac_approx": "reduce"}),
    "LA-diag": ("diag", False, {}),
    "LLLA": ("kron", True, {}),
}


def _laplace(model, name: str):
    from laplace import Laplace

    structure, last, backend_kwargs = POSTERIORS[name]
    return Laplace(
        model,
        "classification",
        subset_of_weights="lora",
        hessian_structure=structure,
        lora_modules=last_layer_modules(model) if last else None,
        backend_kwargs=dict(backend_kwargs),
    )


def fit_case_seed(cfg: BatteryConfig, case: Case, seed: int) -> dict[str, Any]:
    """Fine-tune, fit the posteriors and cache the Jacobians of one run.

    The expensive part; its artifacts are saved by `run_battery` so that
    `evaluate` can be re-run without a backward pass.

    Returns
    -------
    dict
        ``model`` (fine-tuned), ``labels`` and ``logits`` (MAP, val / test),
        ``lora`` (the fine-tuned LoRA weights), ``states`` (the fitted
        posteriors' `state_dict`), ``jacobians`` (`JacobianBatch` lists per
        LoRA subset and split), ``timings``.
    """
    data = load_dataset(case.dataset)
    dcfg = _demo_config(cfg, case)
    torch.manual_seed(seed)
    model, tokenizer = build_case_model(cfg, case, data, seed)
    splits = make_splits(dcfg, data, tokenizer, seed)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    train_map(model, splits["train"], dcfg.steps, dcfg.lr, dcfg.weight_decay)
    timings["train_s"] = time.perf_counter() - t0
    art: dict[str, Any] = {
        "labels": {k: torch.cat([b["labels"] for b in v]) for k, v in splits.items()},
        "logits": {s: predict_logits(model, splits[s]) for s in ("val", "test")},
        "lora": {
            n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n
        },
        "states": {},
        "jacobians": {},
    }
    for name in POSTERIORS:
        t0 = time.perf_counter()
        la = _laplace(model, name)
        torch.manual_seed(seed)
        la.fit(splits["train"])
        la.prior_precision = 1.0
        art["states"][name] = la.state_dict()
        key = "last" if POSTERIORS[name][1] else "all"
        if key not in art["jacobians"]:  # the same LoRA weights share them
            art["jacobians"][key] = {
                s: jacobian_batches(la, splits[s], progress_bar=True, desc=f"{s} J")
                for s in ("val", "test")
            }
            # the training examples fit kept for the prior's trust region
            art["jacobians"][key]["train"] = jacobian_batches(
                la, la.trust_region_batches
            )
        timings[f"{name}_fit_s"] = time.perf_counter() - t0
        del la
    art["timings"] = timings
    return {"model": model, **art}


def evaluate(art: dict[str, Any], seed: int) -> dict[str, Any]:
    """Every method's test metrics from a run's artifacts (no backward pass).

    The Laplace objects are rebuilt on the fine-tuned model from their fitted
    state, so ``LA`` is exactly ``Laplace(...)``, ``fit``,
    ``optimize_prior_precision()``, ``la(x)``: the library's defaults. Each
    Laplace method also reports ``flipped``: the fraction of test examples
    whose predicted class differs from MAP's.

    Returns
    -------
    dict
        One metrics dict per method, ``seed``, ``priors``, ``timings``.
    """
    model, labels, logits = art["model"], art["labels"], art["logits"]
    y = labels["test"]
    map_pred = logits["test"].argmax(-1)
    out: dict[str, Any] = {"seed": seed}
    out["MAP"] = classification_metrics(logits["test"].softmax(-1), y)
    out["MAP"]["confidence"] = float(logits["test"].softmax(-1).max(-1).values.mean())
    T = fit_temperature(logits["val"], labels["val"])
    out["TS"] = classification_metrics((logits["test"].double() / T).softmax(-1), y)
    priors: dict[str, Any] = {"TS": {"temperature": T}}

    def posterior(name):
        la = _laplace(model, name)
        la.load_state_dict(art["states"][name])
        jacobians = art["jacobians"]["last" if POSTERIORS[name][1] else "all"]
        return la, jacobians

    def score(name, la, test, **kwargs):
        out[name] = _evaluate(la, test, y, map_pred, **kwargs)
        priors[name] = la.prior_precision.tolist()
        if la.trust_region is not None:
            trust[name] = la.trust_region.to_dict()

    trust: dict[str, Any] = {}
    for name in ("LA-diag", "LLLA", "LA-reduce"):
        la, J = posterior(name)
        la.optimize_prior_precision(train_batches=J["train"])
        score(name, la, J["test"])

    la, J = posterior("LA")
    val, test = J["val"], J["test"]
    la.optimize_prior_precision(train_batches=J["train"])
    default = la.prior_precision.clone()
    score("LA", la, test)
    torch.manual_seed(seed)
    score("LA-mc", la, test, link_approx="mc")
    score("LA-bridge", la, test, link_approx="bridge")
    la.optimize_prior_precision(method="auto", val_loader=val, train_batches=J["train"])
    score("LA-auto", la, test)
    priors["LA-auto"] = la.prior_choice.to_dict()
    # the LoRA prior without the trust region (the previous default)
    la.optimize_prior_precision(trust_region=None)
    score("LA-notrust", la, test)
    # laplace-torch's default prior (one scalar, plain marglik), both probits
    la.optimize_prior_precision(prior_structure="scalar", trust_region=None)
    score("LA-scalar", la, test)
    la.center_logits = False
    score("LA-rawprobit", la, test)
    la.center_logits = True
    la.optimize_prior_precision(prior_structure="layerwise", trust_region=None)
    score("LA-layerwise", la, test)
    is_b = torch.tensor([w.kind == "B" for w in la.lora_weights]).long()
    marglik_groups(la, is_b)
    score("LA-AB", la, test)
    la.prior_precision = default
    out["priors"] = priors
    out["trust_region"] = trust
    out["timings"] = dict(art["timings"])
    return out


def _mean_record(runs: list[dict[str, Any]]) -> dict[str, Any]:
    record: dict[str, Any] = {}
    for m in METHODS + ABLATIONS:
        record[m] = {k: statistics.fmean(r[m][k] for r in runs) for k in METRICS}
        record[m].update(
            {
                f"{k}_std": statistics.stdev([r[m][k] for r in runs])
                if len(runs) > 1
                else 0.0
                for k in METRICS
            }
        )
    record["MAP"]["confidence"] = statistics.fmean(r["MAP"]["confidence"] for r in runs)
    for m in METHODS[2:] + ABLATIONS:  # the Laplace methods
        record[m]["flipped"] = statistics.fmean(r[m]["flipped"] for r in runs)
    return record


def acceptance(record: dict[str, Any], method: str = "LA") -> dict[str, bool]:
    """The issue's checks of one case's mean record for `method`.

    Returns
    -------
    dict[str, bool]
        ``nll_le_1.02x_map``, ``ece_le_map_plus_1pt``, ``acc_ge_map_minus_1pt``
        and, where MAP is overconfident, ``better_nll_and_ece``.
    """
    la, mp = record[method], record["MAP"]
    overconfident = mp["confidence"] > mp["acc"]
    checks = {
        "nll_le_1.02x_map": la["nll"] <= 1.02 * mp["nll"],
        "ece_le_map_plus_1pt": la["ece"] <= mp["ece"] + 0.01,
        "acc_ge_map_minus_1pt": la["acc"] >= mp["acc"] - 0.01,
    }
    if overconfident:
        checks["better_nll_and_ece"] = la["nll"] < mp["nll"] and la["ece"] < mp["ece"]
    return checks


def aggregate(cfg: BatteryConfig, cases: list[Case] = CASES) -> dict[str, Any]:
    """Summary JSON / Markdown / PNG from the run files in `cfg.output`.

    Returns
    -------
    dict
        ``{"config": ..., "cases": [one record per case]}``, as written to
        ``calibration.json``.
    """
    out = Path(cfg.output)
    records = []
    for case in cases:
        runs = [
            json.loads(p.read_text())
            for s in cfg.seeds
            if (p := out / "runs" / f"{case.name}_s{s}.json").exists()
        ]
        if not runs:
            continue
        record = {
            "case": case.name,
            "dataset": case.dataset,
            "targets": list(case.targets),
            "n_train": case.n_train,
            "seeds": runs,
            **_mean_record(runs),
        }
        record["map_overconfident"] = record["MAP"]["confidence"] > record["MAP"]["acc"]
        record["checks"] = {m: acceptance(record, m) for m in METHODS[2:] + ABLATIONS}
        record["auto_nll_le_ts"] = record["LA-auto"]["nll"] <= record["TS"]["nll"]
        records.append(record)
    summary = {"config": asdict(cfg), "cases": records}
    (out / "calibration.json").write_text(json.dumps(summary, indent=1))
    (out / "calibration.md").write_text(to_markdown(records))
    plot(records, out / "calibration.png")
    return summary


def _fmt(s: dict[str, float]) -> str:
    return f"{100 * s['acc']:.1f} / {100 * s['ece']:.1f} / {s['nll']:.3f}"


def summary_markdown(records: list[dict[str, Any]]) -> str:
    """The two tables of the README: per case, and per method over the cases.

    Returns
    -------
    str
        Markdown.
    """
    lines = [
        "| case | MAP conf - acc | MAP | TS | LA | LA-auto | LA checks | "
        "LA-auto checks |",
        "|---|---:|---|---|---|---|---|---|",
    ]
    for r in records:
        gap = 100 * (r["MAP"]["confidence"] - r["MAP"]["acc"])
        marks = {
            m: "pass"
            if all(r["checks"][m].values())
            else "**fail**: " + ", ".join(k for k, v in r["checks"][m].items() if not v)
            for m in ("LA", "LA-auto")
        }
        lines.append(
            f"| {r['case']} | {gap:+.1f} | {_fmt(r['MAP'])} | {_fmt(r['TS'])} | "
            f"{_fmt(r['LA'])} | {_fmt(r['LA-auto'])} | {marks['LA']} | "
            f"{marks['LA-auto']} |"
        )
    n = len(records)
    lines += [
        "",
        "| method | cases passing every check | NLL / MAP's | ECE - MAP's (points) "
        "| ACC - MAP's (points) | predictions changed (%) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for m in METHODS[2:] + ABLATIONS:
        if not all(m in r for r in records):  # results from before this method
            continue
        passing = sum(all(r["checks"][m].values()) for r in records)

        def mean(f, m=m):
            return statistics.fmean(f(r[m], r["MAP"]) for r in records)

        lines.append(
            f"| {m} | {passing} / {n} | "
            f"{mean(lambda a, b: a['nll'] / b['nll']):.3f} | "
            f"{mean(lambda a, b: 100 * (a['ece'] - b['ece'])):+.1f} | "
            f"{mean(lambda a, b: 100 * (a['acc'] - b['acc'])):+.1f} | "
            f"{mean(lambda a, b: 100 * a['flipped']):.1f} |"
        )
    ts_wins = sum(r["auto_nll_le_ts"] for r in records)
    lines += ["", f"LA-auto's NLL <= temperature scaling's on {ts_wins} / {n} cases."]
    return "\n".join(lines) + "\n"


README_BEGIN = "<!-- calibration:begin -->"
README_END = "<!-- calibration:end -->"


def readme_block(summary: dict[str, Any]) -> str:
    """The README's results block, rendered from `calibration.json`.

    Returns
    -------
    str
        Markdown between the calibration markers (included).
    """
    records = summary["cases"]
    cfg = summary["config"]
    seeds = len(cfg["seeds"])
    return (
        f"{README_BEGIN}\n"
        f"Seed means over {seeds} seeds; cells are ACC (%) / ECE (%) / NLL. Checks "
        "(the issue's, on the means): NLL <= 1.02x MAP's, ECE <= MAP's + 1 point, "
        "ACC >= MAP's - 1 point, and where MAP is overconfident (its mean confidence "
        "above its accuracy) NLL and ECE strictly below MAP's.\n\n"
        f"{summary_markdown(records)}{README_END}"
    )


def update_readme(summary: dict[str, Any], path: str | Path) -> None:
    """Replace the block between the calibration markers of `path`."""
    path = Path(path)
    text = path.read_text()
    start, end = text.index(README_BEGIN), text.index(README_END) + len(README_END)
    path.write_text(text[:start] + readme_block(summary) + text[end:])


def to_markdown(records: list[dict[str, Any]]) -> str:
    """The summary tables, then every case and method (seed means).

    Returns
    -------
    str
        Markdown.
    """
    lines = [
        summary_markdown(records),
        "| case | method | ACC (%) | ECE (%) | NLL | Brier | changed (%) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        for m in METHODS + ABLATIONS:
            s = r[m]
            flipped = f"{100 * s['flipped']:.1f}" if "flipped" in s else "-"
            lines.append(
                f"| {r['case']} | {m} | {100 * s['acc']:.1f} ± "
                f"{100 * s['acc_std']:.1f} | {100 * s['ece']:.1f} ± "
                f"{100 * s['ece_std']:.1f} | {s['nll']:.3f} ± {s['nll_std']:.3f} | "
                f"{s['brier']:.3f} | {flipped} |"
            )
    return "\n".join(lines) + "\n"


def plot(records: list[dict[str, Any]], path: Path) -> None:
    """NLL and ECE of every method relative to MAP, per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = ["TS", "LLLA", "LA", "LA-auto", "LA-diag", "LA-scalar", "LA-rawprobit"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    x = torch.arange(len(records)).float()
    w = 0.8 / len(methods)
    for i, m in enumerate(methods):
        nll = [r[m]["nll"] / r["MAP"]["nll"] for r in records]
        ece = [100 * (r[m]["ece"] - r["MAP"]["ece"]) for r in records]
        axes[0].bar(x + i * w, nll, w, label=m)
        axes[1].bar(x + i * w, ece, w, label=m)
    axes[0].axhline(1.0, color="k", lw=1)
    axes[1].axhline(0.0, color="k", lw=1)
    axes[0].set(ylabel="NLL / MAP's NLL", title="NLL relative to MAP (lower: better)")
    axes[1].set(ylabel="ECE - MAP's ECE (points)", title="ECE change (lower: better)")
    for ax in axes:
        ax.set_xticks(x + 0.4 - w / 2, [r["case"] for r in records], rotation=35)
        ax.tick_params(axis="x", labelsize=7)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _artifact_path(cfg: BatteryConfig, case: Case, seed: int) -> Path:
    return Path(cfg.output) / "artifacts" / f"{case.name}_s{seed}.pt"


def load_artifacts(cfg: BatteryConfig, case: Case, seed: int) -> dict[str, Any]:
    """A run's saved artifacts, with the fine-tuned model rebuilt.

    Returns
    -------
    dict
        As `fit_case_seed` returns.
    """
    art = torch.load(_artifact_path(cfg, case, seed), weights_only=False)
    data = load_dataset(case.dataset)
    model, _ = build_case_model(cfg, case, data, seed)
    with torch.no_grad():
        params = dict(model.named_parameters())
        for n, v in art["lora"].items():
            params[n].copy_(v)
    return {"model": model, **art}


def run_battery(
    cfg: BatteryConfig,
    cases: list[Case] = CASES,
    shard: tuple[int, int] = (0, 1),
    log=print,
    reevaluate: bool = False,
) -> None:
    """Run every (case, seed) of this shard that has no run file yet.

    Each run saves its artifacts (fine-tuned LoRA weights, fitted posterior
    states, validation / test Jacobians; ``artifacts/``, not committed) and
    its metrics (``runs/``). With `reevaluate`, the metrics of every run with
    artifacts are recomputed from them (after a change of the library's
    prior or predictive), without fine-tuning, fitting or Jacobians.
    """
    torch.set_num_threads(cfg.threads)
    runs_dir = Path(cfg.output) / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    todo = [(c, s) for c in cases for s in cfg.seeds]
    for i, (case, seed) in enumerate(todo):
        path = runs_dir / f"{case.name}_s{seed}.json"
        art_path = _artifact_path(cfg, case, seed)
        if i % shard[1] != shard[0]:
            continue
        t0 = time.perf_counter()
        if reevaluate and art_path.exists():
            log(f"== {case.name} seed {seed}: re-evaluating")
            record = evaluate(load_artifacts(cfg, case, seed), seed)
        elif path.exists():
            continue
        else:
            log(f"== {case.name} seed {seed}")
            art = fit_case_seed(cfg, case, seed)
            art_path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({k: v for k, v in art.items() if k != "model"}, art_path)
            record = evaluate(art, seed)
        record["seconds"] = time.perf_counter() - t0
        log(f"  LA {record['LA']}, MAP {record['MAP']}")
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        tmp.rename(path)
