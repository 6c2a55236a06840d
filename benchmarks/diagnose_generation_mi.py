"""Why the mutual information of the LM posterior does not rise on shifted text.

Rebuilds the model and posterior of `bench_generation.py` (same settings,
seed, fine-tuning and marglik prior; ``--prior auto`` as there), then on the
first ``--n-diag`` held-out articles of the topic and of the shifted texts
measures, per token with a next-token target:

- the mutual information of the linearised predictive with `K` posterior
  draws (as the evaluation), and with `K` draws from the prior alone
  (``N(0, prior_precision^-1)``: what a posterior the data did not
  constrain at all would give);
- the size of the perturbation the draws make to the decoder's last hidden
  states, ``E_k ||J_h delta_k||^2``, for both;
- the MAP's predictive entropy, and the mutual information in bins of it
  (the same bin edges for both sides: terciles of the pooled tokens);
- per kind of LoRA weight (`lora_A`, `lora_B`), the posterior variance over
  the prior variance, averaged over the weights (1: the data did not move
  the posterior from the prior).

Usage::

    python benchmarks/diagnose_generation_mi.py --threads 1

Writes ``mi_diagnosis.json`` and ``mi_diagnosis.md`` under ``--output``
(default ``benchmarks/results/generation``).
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from benchmarks.bench_generation import (  # noqa: E402
    GenConfig,
    build,
    finetune,
    fit_posterior,
    lm_batches,
    texts,
    validation_texts,
)
from benchmarks.common import command_line, script_parser, write_results  # noqa: E402
from laplace_lora_backend.curvature.token_loss import IGNORE_INDEX  # noqa: E402
from laplace_lora_backend.uncertainty import SoftmaxAverage, entropy  # noqa: E402

SOURCES = ("posterior", "prior")


def draws(la, source: str, K: int, g: torch.Generator) -> torch.Tensor:
    """`K` directions in the LoRA weights: posterior draws minus the mean, or
    draws of the prior ``N(0, diag(prior_precision)^-1)``.

    Returns
    -------
    torch.Tensor
        `(K, P)`.
    """
    if source == "posterior":
        return la.sample(K, g) - la.mean
    z = torch.randn(K, la.n_params, generator=g, dtype=la.mean.dtype)
    return z / la.prior_precision_diag.sqrt()


def token_measures(la, batch: dict, K: int, g: torch.Generator) -> dict:
    """Per target token: MAP entropy, and per source MI and ``||dh||^2``.

    Returns
    -------
    dict
        Flat tensors over the tokens with a target.
    """
    x = {k: v for k, v in batch.items() if k != "labels"}
    has = batch["labels"] != IGNORE_INDEX
    split = la.decoder_head_split(x)
    if split is None:
        raise ValueError("the diagnosis needs a model that splits decoder/head")
    out = {}
    for source in SOURCES:
        h, dhs = la.logits_and_jvp(x, draws(la, source, K, g), split)
        average = SoftmaxAverage()
        with torch.no_grad():
            for dh in dhs:
                average.add(split.head(h + dh))
            _, _, _, mi = average.result()
            out[f"mi_{source}"] = mi[has]
            out[f"dh2_{source}"] = dhs.pow(2).sum(-1).mean(0)[has]
    with torch.no_grad():
        out["map_entropy"] = entropy(split.head(h).softmax(-1))[has]
        out["h2"] = h.pow(2).sum(-1)[has]
    return out


def variance_ratios(la) -> dict:
    """Mean posterior over prior variance of the `lora_A` and `lora_B` weights.

    Returns
    -------
    dict
    """
    post = la.posterior_precision.diag(exponent=-1)
    ratio = post * la.prior_precision_diag
    out, cur = {}, 0
    for w in la.lora_weights:
        n = w.param.numel()
        kind = "lora_A" if "lora_A" in w.name else "lora_B"
        out.setdefault(kind, []).append(ratio[cur : cur + n])
        cur += n
    return {k: float(torch.cat(v).mean()) for k, v in out.items()}


def summarise(parts: list[dict], edges: torch.Tensor) -> dict:
    """Means over the tokens, and the MI per MAP-entropy bin.

    Returns
    -------
    dict
    """
    t = {k: torch.cat([p[k] for p in parts]).double() for k in parts[0]}
    row = {k: float(v.mean()) for k, v in t.items()}
    row["tokens"] = int(t["map_entropy"].numel())
    row["dh2_ratio"] = row["dh2_posterior"] / row["dh2_prior"]
    bins = torch.bucketize(t["map_entropy"], edges)
    row["mi_posterior_by_entropy_bin"] = [
        float(t["mi_posterior"][bins == b].mean()) if (bins == b).any() else None
        for b in range(len(edges) + 1)
    ]
    row["tokens_by_entropy_bin"] = [
        int((bins == b).sum()) for b in range(len(edges) + 1)
    ]
    return row


def run(cfg: GenConfig, n_diag: int) -> dict:
    t0 = time.perf_counter()
    data, train, held_out, shifted = texts(cfg)
    model, tokenizer = build(cfg, data)
    train_b = lm_batches(train, tokenizer, cfg)
    finetune(model, train_b, cfg)
    val_b = lm_batches(validation_texts(data, cfg), tokenizer, cfg)
    la = fit_posterior(model, train_b, cfg, val_b)
    parts = {}
    for side, items in (("in_domain", held_out), ("shifted", shifted)):
        g = torch.Generator().manual_seed(cfg.seed)
        batches = lm_batches(items[:n_diag], tokenizer, cfg)
        parts[side] = [
            token_measures(la, b, cfg.n_samples, g) for b in tqdm(batches, desc=side)
        ]
    pooled = torch.cat([p["map_entropy"] for side in parts for p in parts[side]])
    edges = torch.quantile(pooled.double(), torch.tensor([1 / 3, 2 / 3]).double())
    result = {side: summarise(parts[side], edges) for side in parts}
    result["entropy_bin_edges"] = edges.tolist()
    result["variance_ratio"] = variance_ratios(la)
    result["prior_precision"] = la.prior_precision.flatten().tolist()
    result["config"] = {**asdict(cfg), "n_diag": n_diag}
    result["seconds"] = time.perf_counter() - t0
    return result


def to_markdown(result: dict, command: str) -> str:
    cfg = result["config"]
    e = result["entropy_bin_edges"]
    lines = [
        f"`{command}`: {cfg['model']}, prior {cfg['prior']}, K={cfg['n_samples']}, "
        f"first {cfg['n_diag']} texts of each side; per token with a target. "
        f"{result['seconds']:.0f} s.",
        "",
        "| side | tokens | MAP entropy | MI posterior | MI prior only | "
        "E‖dh‖² posterior | E‖dh‖² prior only | posterior / prior | "
        f"MI posterior by MAP entropy (<{e[0]:.2f} / <{e[1]:.2f} / above) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for side in ("in_domain", "shifted"):
        r = result[side]
        pairs = zip(
            r["mi_posterior_by_entropy_bin"], r["tokens_by_entropy_bin"], strict=True
        )
        bins = " / ".join("-" if v is None else f"{v:.4f} ({n})" for v, n in pairs)
        lines.append(
            f"| {side} | {r['tokens']} | {r['map_entropy']:.3f} | "
            f"{r['mi_posterior']:.4f} | {r['mi_prior']:.4f} | "
            f"{r['dh2_posterior']:.4g} | {r['dh2_prior']:.4g} | "
            f"{r['dh2_ratio']:.3f} | {bins} |"
        )
    ratios = ", ".join(f"{k} {v:.3f}" for k, v in result["variance_ratio"].items())
    lines += ["", f"Posterior / prior variance of the weights (mean): {ratios}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = script_parser(__doc__, repeats=None)
    parser.add_argument("--tiny", action="store_true", help="tiny random Llama")
    parser.add_argument("--prior", choices=["marglik", "auto"], default="marglik")
    parser.add_argument("--n-diag", type=int, default=20, help="texts per side")
    parser.set_defaults(output="benchmarks/results/generation")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = GenConfig.tiny() if args.tiny else GenConfig()
    cfg = replace(cfg, prior=args.prior)
    command = command_line("benchmarks/diagnose_generation_mi.py", argv)
    result = {**run(cfg, args.n_diag), "command": command}
    stem = "mi_diagnosis" if cfg.prior == "marglik" else f"mi_diagnosis_{cfg.prior}"
    write_results(args.output, stem, result, to_markdown(result, command), indent=2)
    return result


if __name__ == "__main__":
    main()
