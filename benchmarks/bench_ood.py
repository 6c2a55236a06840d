"""Out-of-distribution detection with the uncertainty API (a real shift).

SmolLM2-135M with LoRA is fine-tuned on drug-review sentiment exactly as the
demo does (seeded), then shown its own test reviews (in distribution) and BBC
news articles in the same prompt (out of distribution: the other data set's
texts). Per input: MAP's max probability, and from
``la.predictive_uncertainty(x)`` (library defaults: ``Laplace(...,
subset_of_weights="lora", hessian_structure="kron")``, ``fit``,
``optimize_prior_precision()``) LA's max probability, entropy and mutual
information. Reported: AUROC of each score for telling BBC from drug-review
inputs (1 = perfect, 0.5 = chance), per seed and mean.

Usage: ``python benchmarks/bench_ood.py [--seeds 0 1] [--n 200]`` (about 6
minutes per seed on 2 CPU cores). Writes ``benchmarks/results/ood.{json,md}``.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from laplace import Laplace  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import laplace_lora_backend  # noqa: E402,F401
from benchmarks.common import (  # noqa: E402
    command_line,
    machine,
    script_parser,
    write_results,
)
from laplace_lora_backend.demo import DemoConfig, build_model, make_splits  # noqa: E402
from laplace_lora_backend.demo.data import load_dataset, tokenize_prompts  # noqa: E402
from laplace_lora_backend.demo.finetune import predict_logits, train_map  # noqa: E402
from laplace_lora_backend.demo.splits import BatchList  # noqa: E402

SCORES = ["MAP 1 - max prob", "LA 1 - max prob", "LA entropy", "LA mutual information"]


def auroc(in_scores: torch.Tensor, out_scores: torch.Tensor) -> float:
    """P(score of an OOD input > score of an in-distribution one), ties half."""
    diff = out_scores.double()[:, None] - in_scores.double()[None, :]
    return float((diff > 0).double().mean() + 0.5 * (diff == 0).double().mean())


def ood_batches(cfg: DemoConfig, data, other, tokenizer) -> BatchList:
    """The other data set's test texts in this data set's prompt (labels 0)."""
    texts = [(text, 0) for text, _ in other.test[: cfg.n_test]]
    enc = tokenize_prompts(data, texts, tokenizer, cfg.max_length)
    n, bs = len(texts), cfg.batch_size
    return BatchList(
        [{k: v[i : i + bs] for k, v in enc.items()} for i in range(0, n, bs)]
    )


def scores(la, model, batches, desc: str) -> dict[str, torch.Tensor]:
    out = {s: [] for s in SCORES}
    for b in tqdm(batches, desc=desc):
        x = {k: v for k, v in b.items() if k != "labels"}  # no labels needed
        with torch.no_grad():
            map_probs = model(x).softmax(-1)
        u = la.predictive_uncertainty(x, generator=torch.Generator().manual_seed(0))
        out["MAP 1 - max prob"].append(1 - map_probs.max(-1).values)
        out["LA 1 - max prob"].append(1 - u.probs.max(-1).values)
        out["LA entropy"].append(u.entropy)
        out["LA mutual information"].append(u.mutual_information)
    return {k: torch.cat(v) for k, v in out.items()}


def run_seed(cfg: DemoConfig, seed: int) -> dict:
    data, other = load_dataset("drugreview"), load_dataset("bbcnews")
    torch.manual_seed(seed)
    model, tokenizer = build_model(cfg, data, seed)
    splits = make_splits(cfg, data, tokenizer, seed)
    train_map(model, splits["train"], cfg.steps, cfg.lr, cfg.weight_decay)
    la = Laplace(model, "classification", subset_of_weights="lora")
    la.fit(splits["train"])
    la.optimize_prior_precision()
    inside = scores(la, model, splits["test"], "drug reviews")
    outside = scores(la, model, ood_batches(cfg, data, other, tokenizer), "BBC")
    test_logits = predict_logits(model, splits["test"])
    labels = torch.cat([b["labels"] for b in splits["test"]])
    return {
        "seed": seed,
        "auroc": {s: auroc(inside[s], outside[s]) for s in SCORES},
        "mean_in": {s: float(inside[s].mean()) for s in SCORES},
        "mean_out": {s: float(outside[s].mean()) for s in SCORES},
        "map_test_acc": float((test_logits.argmax(-1) == labels).double().mean()),
        "trust_region": la.trust_region.to_dict(),
    }


def to_markdown(result: dict) -> str:
    seeds = [r["seed"] for r in result["seeds"]]
    lines = [
        f"`{result['command']}` ({result['machine']}, seeds {seeds}, "
        f"{result['n']} inputs each side)",
        "",
        "| score | AUROC (mean) | per seed | mean in / out |",
        "|---|---:|---|---|",
    ]
    for s in SCORES:
        per = [r["auroc"][s] for r in result["seeds"]]
        mi = statistics.fmean(r["mean_in"][s] for r in result["seeds"])
        mo = statistics.fmean(r["mean_out"][s] for r in result["seeds"])
        lines.append(
            f"| {s} | {statistics.fmean(per):.3f} | "
            f"{', '.join(f'{v:.3f}' for v in per)} | {mi:.3f} / {mo:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = script_parser(__doc__, repeats=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--n", type=int, default=200, help="inputs per side")
    parser.add_argument(
        "--quick", action="store_true", help="tiny random model, small sizes (smoke)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = DemoConfig(n_test=args.n)
    if args.quick:
        cfg = DemoConfig.quick_config(model="tiny", n_test=args.n)
    t0 = time.perf_counter()
    runs = [run_seed(cfg, s) for s in args.seeds]
    result = {
        "command": command_line("benchmarks/bench_ood.py"),
        "machine": machine(args.threads),
        "n": args.n,
        "seeds": runs,
        "auroc": {s: statistics.fmean(r["auroc"][s] for r in runs) for s in SCORES},
        "seconds": time.perf_counter() - t0,
    }
    write_results(args.output, "ood", result, to_markdown(result))


if __name__ == "__main__":
    main()
