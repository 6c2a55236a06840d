"""One demo run per seed, and `run_demo` over seeds (writes the results)."""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from laplace import Laplace
from tqdm.auto import tqdm

from laplace_lora_backend import LoRAEF, LoRAGGN
from laplace_lora_backend.demo.baselines import fit_temperature, mc_dropout_probs
from laplace_lora_backend.demo.config import METHODS, DemoConfig, free_threads
from laplace_lora_backend.demo.data import TextDataset, load_dataset
from laplace_lora_backend.demo.finetune import predict_logits, train_map
from laplace_lora_backend.demo.metrics import classification_metrics
from laplace_lora_backend.demo.models import build_model
from laplace_lora_backend.demo.prior import tune_prior
from laplace_lora_backend.demo.report import markdown_table, reliability_plot, summarize
from laplace_lora_backend.demo.splits import make_splits
from laplace_lora_backend.glm import jacobian_batches

__all__ = ["run_demo", "run_seed"]


# the Laplace methods: name -> (hessian_structure, lora_modules)
LAPLACE_METHODS = {
    "LLLA": ("kron", ["lm_head"]),
    "LA": ("kron", None),
    "LA-diag": ("diag", None),
}
# curvature of the Laplace methods: --kfac-backend -> (backend, backend_kwargs)
BACKENDS = {
    "ggn": (LoRAGGN, {}),
    "mc": (LoRAGGN, {"stochastic": True}),
    "ef": (LoRAEF, {}),
}


def baseline_probs(
    cfg: DemoConfig, model: Any, splits: dict[str, list], labels: dict
) -> tuple[dict[str, torch.Tensor], float]:
    """Test probabilities of MAP, temperature scaling and MC dropout.

    Returns
    -------
    probs : dict[str, torch.Tensor]
        ``"MAP"``, ``"TS"``, ``"MCD"``: `(n_test, C)`.
    temperature : float
    """
    val_logits = predict_logits(model, splits["val"])
    test_logits = predict_logits(model, tqdm(splits["test"], desc="MAP test"))
    probs = {"MAP": test_logits.softmax(-1)}
    T = fit_temperature(val_logits, labels["val"])
    probs["TS"] = (test_logits.double() / T).softmax(-1)
    probs["MCD"] = mc_dropout_probs(
        model, tqdm(splits["test"], desc="MC dropout"), cfg.mcd_samples
    )
    return probs, T


def laplace_method(
    cfg: DemoConfig,
    model: Any,
    splits: dict[str, list],
    name: str,
    seed: int,
    caches: dict[str, dict[str, list]],
    log: Any,
) -> tuple[torch.Tensor, dict[str, Any], dict[str, float]]:
    """Fit one Laplace method, tune its prior (``cfg.prior``), predict on test.

    The validation / test Jacobians are cached in `caches` per LoRA subset:
    LA and LA-diag share theirs.

    Returns
    -------
    probs : torch.Tensor
        `(n_test, C)`.
    prior : dict[str, Any]
        The prior choice (`tune_prior`).
    timings : dict[str, float]
        ``<name>_fit_s`` and ``<name>_predict_s``.
    """
    structure, modules = LAPLACE_METHODS[name]
    backend, backend_kwargs = BACKENDS[cfg.kfac_backend]
    log(f"{name}: fitting ({structure}, {cfg.kfac_backend})")
    t0 = time.perf_counter()
    la = Laplace(
        model,
        "classification",
        subset_of_weights="lora",
        hessian_structure=structure,
        lora_modules=modules,
        backend=backend,
        backend_kwargs=dict(backend_kwargs),
    )
    torch.manual_seed(seed)
    la.fit(splits["train"], progress_bar=True)
    timings = {f"{name}_fit_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    subset = "lm_head" if modules else "all"
    if subset not in caches:
        caches[subset] = {
            split: jacobian_batches(
                la, splits[split], progress_bar=True, desc=f"{name} J ({split})"
            )
            for split in ("val", "test")
        }
    cache = caches[subset]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prior = tune_prior(la, cache["val"], cfg.prior)
    for w in caught:
        if "switched off" in str(w.message):
            log(f"  {name}: {w.message}")
    probs = torch.cat([la(jb) for jb, _ in cache["test"]])
    timings[f"{name}_predict_s"] = time.perf_counter() - t0
    return probs, prior, timings


def run_seed(cfg: DemoConfig, data: TextDataset, seed: int, log) -> dict[str, Any]:
    """Fine-tune one seed, fit the Laplace methods, score every method on test.

    Returns
    -------
    dict[str, Any]
        ``seed``, ``metrics`` per method, ``priors``, ``timings``, the test
        ``probs`` per method and the test ``labels``.
    """
    torch.manual_seed(seed)
    model, tokenizer = build_model(cfg, data, seed)
    splits = make_splits(cfg, data, tokenizer, seed)
    t0 = time.perf_counter()
    train_map(model, splits["train"], cfg.steps, cfg.lr, cfg.weight_decay)
    timings = {"train_s": time.perf_counter() - t0}
    labels = {k: torch.cat([b["labels"] for b in v]) for k, v in splits.items()}
    probs, T = baseline_probs(cfg, model, splits, labels)
    priors: dict[str, Any] = {"TS": {"temperature": T}}
    caches: dict[str, dict[str, list]] = {}
    for name in LAPLACE_METHODS:
        probs[name], priors[name], times = laplace_method(
            cfg, model, splits, name, seed, caches, log
        )
        timings.update(times)
    metrics = {m: classification_metrics(probs[m], labels["test"]) for m in METHODS}
    return {
        "seed": seed,
        "metrics": metrics,
        "priors": priors,
        "timings": timings,
        "probs": {m: p.tolist() for m, p in probs.items()},
        "labels": labels["test"].tolist(),
    }


def run_demo(cfg: DemoConfig, log=print) -> dict[str, Any]:
    """Run every seed, write table, JSON and reliability diagram to `output`.

    Returns
    -------
    dict[str, Any]
        What the JSON holds: the config, per-seed metrics, priors and
        timings, mean and std per method, and the seconds taken.
    """
    cfg = replace(cfg, threads=cfg.threads or free_threads())  # recorded in the JSON
    torch.set_num_threads(cfg.threads)
    data = load_dataset(cfg.dataset)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    runs = []
    for seed in cfg.seeds:
        log(f"== seed {seed}: {cfg.model} on {cfg.dataset}")
        runs.append(run_seed(cfg, data, seed, log))
    summary = summarize(runs)
    title = (
        f"{cfg.model} + LoRA on {cfg.dataset} ({len(cfg.seeds)} seed(s), "
        f"{cfg.n_test} test examples)"
    )
    table = markdown_table(summary, len(cfg.seeds), title)
    result = {
        "config": asdict(cfg),
        "seeds": [
            {
                "seed": r["seed"],
                **r["metrics"],
                "priors": r["priors"],
                "timings": r["timings"],
            }
            for r in runs
        ],
        "mean": {
            m: {k: summary[m][k] for k in ("acc", "ece", "nll", "brier")}
            for m in METHODS
        },
        "std": {
            m: {k: summary[m][f"{k}_std"] for k in ("acc", "ece", "nll", "brier")}
            for m in METHODS
        },
        "seconds": time.perf_counter() - t0,
    }
    result.update(result["mean"])  # top level: method -> metrics (seed mean)
    name = f"demo_{cfg.dataset}_{cfg.model}"
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    (out / f"{name}.md").write_text(table + "\n")
    reliability_plot(runs[0], out / f"{name}.png", title)
    log(table)
    log(f"wrote {out / name}.{{md,json,png}} in {result['seconds']:.0f} s")
    return result
