"""Will it run on a 7B model? A Llama-2-7B-shaped model with 2 layers, on CPU.

Issue 17 item 4. A random-init Llama with Llama-2-7B's shapes (hidden 4096,
MLP 11008, 32 heads, vocab 32000) but `--layers` (2) blocks, float32, LoRA
r=16 on every linear layer of the blocks (q, k, v, o, gate, up, down), read
as a 3-class classifier over answer tokens (`AnswerTokenClassifier`, lm_head
trimmed to the 3 answer rows and frozen): 8 random sequences x 64 tokens in
batches of 4, a test batch of 4.

Measured in one process:

- a plain forward + backward over the training batches (the unit);
- ours, ``Laplace(model, "classification", subset_of_weights="lora",
  hessian_structure="kron")`` (library default `lowrank_threshold`): fit,
  log marginal likelihood and probit predictive time, factor bytes; the same
  restricted to each transformer block and to each LoRA module type
  (``lora_modules=``), for the per-layer costs;
- dense: ours with ``lowrank_threshold=None`` and laplace-torch's
  `KronLaplace` + `CurvlinopsGGN`, run only where the estimated memory and
  time fit the budgets (``--dense-max-gib``, ``--dense-max-s``); otherwise
  reported as "not run: needs X GiB / eigh of n^2 (est. Y s)", the eigh time
  extrapolated (O(n^3)) from timed eighs of smaller matrices.

Then the costs per layer, extrapolated to 32 layers, and the memory of the
factors as a formula in (d_model, d_ff, r, k, n_layers, bytes per float),
checked against the measured factor bytes.

Usage (full shape; estimated 10-15 min and a peak RSS of about 4-5 GiB on 2
cores, the dense contenders reported as not run)::

    OMP_NUM_THREADS=2 python benchmarks/bench_7b_shape.py --threads 2

Small validation shape::

    python benchmarks/bench_7b_shape.py --hidden 512 --intermediate 1376 \\
        --vocab 4000 --output /tmp/b7

Writes ``<output>/<name>.{json,md}`` (``benchmarks/results/bench_7b_shape`` by
default).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from laplace import Laplace  # noqa: E402

import laplace_lora_backend  # noqa: E402,F401
from benchmarks.common import timed, write_results  # noqa: E402
from benchmarks.suite.measure import error_message, peak_rss_bytes, rss_bytes  # noqa: E402
from laplace_lora_backend.llm.answer_tokens import (  # noqa: E402
    AnswerTokenClassifier,
    trim_lm_head,
)
from laplace_lora_backend.matrix.lowrank import LowRankFactor  # noqa: E402

__all__ = ["main", "factor_floats", "formula_text"]

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GiB = 2**30
MiB = 2**20
_T0 = time.perf_counter()


def log(msg: str) -> None:
    """A progress line: elapsed seconds, RSS, message."""
    print(
        f"[{time.perf_counter() - _T0:7.1f} s, RSS {rss_bytes() / GiB:5.2f} GiB] {msg}",
        flush=True,
    )


# ----------------------------------------------------------------- shapes
def module_shapes(d: int, f: int, d_kv: int) -> dict[str, tuple[int, int]]:
    """`(in, out)` of each LoRA-wrapped linear layer of one Llama block.

    Returns
    -------
    dict[str, tuple[int, int]]
    """
    return {
        "q_proj": (d, d),
        "k_proj": (d, d_kv),
        "v_proj": (d, d_kv),
        "o_proj": (d, d),
        "gate_proj": (d, f),
        "up_proj": (d, f),
        "down_proj": (f, d),
    }


def side_floats(side: int, threshold: int | None, k: int) -> int:
    """Floats stored for one Kronecker factor of side `side`.

    Low-rank (``side >= threshold``): `U` `(side, k)`, `s` `(k,)` and the
    trace, ``side*k + k + 1``; dense: ``side**2``.

    Returns
    -------
    int
    """
    if threshold is not None and side >= threshold:
        k = min(k, side)
        return side * k + k + 1
    return side * side


def factor_floats(
    d: int,
    f: int,
    r: int,
    k: int,
    layers: int,
    threshold: int | None,
    d_kv: int | None = None,
) -> dict[str, int]:
    """Floats of the fitted Kronecker factors, per module type and in total.

    LoRA on `(in, out)`: `lora_A` `(r, in)` has factors `r x r` and
    `in x in`, `lora_B` `(out, r)` has `out x out` and `r x r`; a side is
    low-rank when ``>= threshold`` (`side_floats`).

    Returns
    -------
    dict[str, int]
        One entry per module type (all layers), ``"per layer"`` and
        ``"total"``.
    """
    d_kv = d if d_kv is None else d_kv
    out: dict[str, int] = {}
    for name, (i, o) in module_shapes(d, f, d_kv).items():
        per = 2 * r * r + side_floats(i, threshold, k) + side_floats(o, threshold, k)
        out[name] = per * layers
    out["per layer"] = sum(out[m] for m in MODULES) // layers
    out["total"] = out["per layer"] * layers
    return out


def formula_text() -> dict[str, str]:
    """The factor-memory formulas (every side low-rank vs all dense).

    Returns
    -------
    dict[str, str]
    """
    return {
        "ours (low-rank, all d_model/d_ff sides >= threshold)": (
            "L * (14 r^2 + k (11 d + 3 f) + 14 (k + 1)) * b"
        ),
        "dense factors": "L * (14 r^2 + 11 d^2 + 3 f^2) * b",
        "dense held after fit (factors + eigenvectors + eigenvalues)": (
            "L * (2 (14 r^2 + 11 d^2 + 3 f^2) + 14 r + 11 d + 3 f) * b"
        ),
        "model weights": "(L (4 d^2 + 3 d f + 2 d) + 2 V d + d) * b_w "
        "(q, k, v, o, gate, up, down, norms; embedding and untrimmed lm_head)",
        "LoRA weights (+ grads)": "L r (11 d + 3 f) * b (x 2)",
        "where": "d = d_model, f = d_ff, r = LoRA rank, k = lowrank_rank, "
        "L = n_layers, V = vocab, b = bytes per posterior float (4: float32), "
        "b_w = bytes per model weight",
    }


# ------------------------------------------------------------------ model
def build(args: argparse.Namespace) -> tuple[torch.nn.Module, list, dict]:
    """The LoRA model, its training batches and a test batch.

    Returns
    -------
    model : AnswerTokenClassifier
    train : list[dict]
    test : dict
    """
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    heads = args.heads or max(1, args.hidden // 128)
    cfg = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=args.vocab,
        num_hidden_layers=args.layers,
        max_position_embeddings=max(4096, args.tokens),
        torch_dtype="float32",
    )
    log(f"building {cfg.num_hidden_layers}-layer Llama d={args.hidden} ...")
    with torch.device(args.device):
        lm = LlamaForCausalLM(cfg)
    ids = list(range(args.classes))
    trim_lm_head(lm, ids)  # the answer rows only: a (C, d) frozen head
    gc.collect()
    lora = LoraConfig(
        r=args.lora_r,
        lora_alpha=2 * args.lora_r,
        target_modules=list(MODULES),
        lora_dropout=0.0,
    )
    peft_lm = get_peft_model(lm, lora)
    with torch.no_grad():  # B = 0 at init would make the GGN of A vanish
        for name, p in peft_lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    model = AnswerTokenClassifier(peft_lm, ids).eval()
    g = torch.Generator().manual_seed(0)
    n = args.sequences + args.batch_size
    x = torch.randint(0, args.vocab, (n, args.tokens), generator=g)
    y = torch.randint(0, args.classes, (n,), generator=g)

    def batch(lo: int, hi: int) -> dict:
        return {
            "input_ids": x[lo:hi].to(args.device),
            "attention_mask": torch.ones_like(x[lo:hi]).to(args.device),
            "labels": y[lo:hi].to(args.device),
        }

    train = [
        batch(i, min(i + args.batch_size, args.sequences))
        for i in range(0, args.sequences, args.batch_size)
    ]
    test = batch(args.sequences, n)
    log(f"model built: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params")
    return model, train, test


class Loader(list):
    """Batches with the `.dataset` length laplace-torch reads."""

    def __init__(self, batches: list) -> None:
        super().__init__(batches)
        self.dataset = range(sum(len(b["labels"]) for b in batches))


# -------------------------------------------------------------- measuring
def fwd_bwd(model: torch.nn.Module, train: list) -> None:
    """One plain forward + backward (cross-entropy) over the training batches."""
    for b in train:
        loss = torch.nn.functional.cross_entropy(model(b), b["labels"])
        loss.backward()
    model.zero_grad(set_to_none=True)


def _tensors(obj: Any):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, LowRankFactor):
        yield from (obj.U, obj.s, obj.trace)
    elif isinstance(obj, list | tuple):
        for o in obj:
            yield from _tensors(o)


def block_bytes(block: list) -> int:
    """Bytes of one block's Kronecker factors (dense or low-rank).

    Returns
    -------
    int
    """
    return sum(t.numel() * t.element_size() for t in _tensors(block))


def held_bytes(la: Any) -> int:
    """Bytes of all distinct tensors in the factors and their decomposition.

    Returns
    -------
    int
    """
    seen: dict[tuple[int, int], int] = {}
    parts = [la.H_facs.kfacs]
    H = getattr(la, "H", None)
    if H is not None and hasattr(H, "eigenvectors"):
        parts += [H.eigenvectors, H.eigenvalues]
    for t in _tensors(parts):
        nbytes = t.numel() * t.element_size()
        seen[(t.data_ptr(), nbytes)] = nbytes
    return sum(seen.values())


def _group(name: str) -> tuple[str | None, str | None]:
    m = re.search(r"layers\.(\d+)\.", name)
    mod = next((x for x in MODULES if f".{x}." in name), None)
    return (m.group(1) if m else None), mod


def factor_breakdown(la: Any, names: list[str]) -> dict[str, dict[str, int]]:
    """Factor bytes per block and per module type.

    Returns
    -------
    dict
        ``{"block": {"0": bytes, ...}, "module": {"q_proj": bytes, ...}}``.
    """
    out: dict[str, dict[str, int]] = {"block": {}, "module": {}}
    for name, block in zip(names, la.H_facs.kfacs, strict=True):
        layer, mod = _group(name)
        nbytes = block_bytes(block)
        if layer is not None:
            out["block"][layer] = out["block"].get(layer, 0) + nbytes
        if mod is not None:
            out["module"][mod] = out["module"].get(mod, 0) + nbytes
    return out


def short_factors(la: Any, names: list[str]) -> list[dict]:
    """Low-rank factors that kept fewer than `lowrank_rank` directions.

    The data can span fewer: in the last block, only the last token's output
    reaches the logits, so the output gradients of its MLP span about
    ``C + sequences`` directions.

    Returns
    -------
    list[dict]
        ``name``, ``side`` and kept ``rank`` of each.
    """
    k = la.lowrank.rank
    return [
        {"name": name, "side": F.dim, "rank": F.s.numel()}
        for name, block in zip(names, la.H_facs.kfacs, strict=True)
        for F in block
        if isinstance(F, LowRankFactor) and F.s.numel() < min(k, F.dim)
    ]


def run_cell(
    build_la: Callable[[], Any], train: list, test: dict, device: str, label: str
) -> tuple[Any, dict]:
    """Fit, evidence and probit predictive of one Laplace object.

    Returns
    -------
    la : Laplace object
    cell : dict
        Seconds (``fit_s``, ``marglik_s``, ``predict_s``), factor bytes
        (``factor_bytes``: the factors; ``held_bytes``: with their
        decomposition), log marginal likelihood and the RSS growth.
    """
    rss0 = rss_bytes()
    la = build_la()
    log(f"{label}: fit ...")
    _, fit_s = timed(lambda: la.fit(Loader(train)), device)
    la.prior_precision = 1.0
    log(f"{label}: fit {fit_s:.2f} s; marglik ...")
    lml, marglik_s = timed(lambda: float(la.log_marginal_likelihood()), device)
    log(f"{label}: marglik {marglik_s:.2f} s; predictive ...")
    _, predict_s = timed(lambda: la(test, link_approx="probit"), device)
    log(f"{label}: predictive {predict_s:.2f} s")
    cell = {
        "fit_s": fit_s,
        "marglik_s": marglik_s,
        "predict_s": predict_s,
        "lml": lml,
        "factor_bytes": sum(block_bytes(b) for b in la.H_facs.kfacs),
        "held_bytes": held_bytes(la),
        "rss_growth_bytes": rss_bytes() - rss0,
    }
    return la, cell


def eigh_probe(sizes: list[int], device: str) -> dict[str, Any]:
    """Seconds of `torch.linalg.eigh` (float32) at `sizes`, and the fitted exponent.

    Returns
    -------
    dict
        ``{"sizes": [...], "seconds": [...], "exponent": float}``.
    """
    g = torch.Generator().manual_seed(0)
    secs = []
    torch.linalg.eigh(torch.eye(64, device=device))  # warm up LAPACK
    for n in sizes:
        A = torch.randn(n, n, generator=g).to(device)
        A = A @ A.T
        _, s = timed(lambda A=A: torch.linalg.eigh(A), device)
        secs.append(s)
        del A
    exponent = (
        math.log(secs[-1] / secs[0]) / math.log(sizes[-1] / sizes[0])
        if len(sizes) > 1 and secs[0] > 0
        else 3.0
    )
    return {"sizes": sizes, "seconds": secs, "exponent": exponent}


def eigh_seconds(n: int, probe: dict) -> float:
    """Extrapolated eigh seconds at side `n` (O(n^3) from the largest probe).

    Returns
    -------
    float
    """
    return probe["seconds"][-1] * (n / probe["sizes"][-1]) ** 3


def dense_estimate(args: argparse.Namespace, probe: dict, model_bytes: int) -> dict:
    """Memory and eigh time a dense fit needs at this shape.

    Returns
    -------
    dict
        ``need_bytes`` (model + factors + eigenvectors), ``eigh_s`` (all
        dense eigh of the fit) and the sides.
    """
    d_kv = args.hidden
    sides = []
    for i, o in module_shapes(args.hidden, args.intermediate, d_kv).values():
        sides += [i, o, args.lora_r, args.lora_r]
    sides *= args.layers
    dense = factor_floats(
        args.hidden, args.intermediate, args.lora_r, 0, args.layers, None
    )["total"]
    return {
        "factor_bytes": dense * 4,
        "need_bytes": model_bytes + 2 * dense * 4,
        "eigh_s": sum(eigh_seconds(s, probe) for s in sides),
        "largest_side": max(sides),
        "eighs": len(sides),
    }


# ------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options.

    Returns
    -------
    argparse.Namespace
    """
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=None, help="default: hidden // 128")
    p.add_argument("--tokens", type=int, default=64, help="tokens per sequence")
    p.add_argument("--sequences", type=int, default=8, help="training sequences")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--classes", type=int, default=3)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument(
        "--lowrank-threshold",
        type=int,
        default=None,
        help="ours: default is the library's (LoRAKronLaplace)",
    )
    p.add_argument("--lowrank-rank", type=int, default=None)
    p.add_argument("--target-layers", type=int, default=32, help="extrapolate to")
    p.add_argument(
        "--dense",
        choices=["auto", "run", "skip"],
        default="auto",
        help="auto: run the dense contenders only within the budgets",
    )
    p.add_argument("--dense-max-gib", type=float, default=12.0)
    p.add_argument("--dense-max-s", type=float, default=600.0)
    p.add_argument(
        "--eigh-probe", type=int, nargs="+", default=[1024, 2048], help="sides timed"
    )
    p.add_argument("--no-breakdown", action="store_true", help="skip restricted fits")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="default: all cores")
    p.add_argument("--output", default="benchmarks/results")
    p.add_argument("--name", default="bench_7b_shape", help="file name stem")
    return p.parse_args(argv)


def _ours(model: torch.nn.Module, args: argparse.Namespace, **kw: Any) -> Any:
    opts = {}
    if args.lowrank_threshold is not None:
        opts["lowrank_threshold"] = args.lowrank_threshold
    if args.lowrank_rank is not None:
        opts["lowrank_rank"] = args.lowrank_rank
    opts.update(kw)
    return Laplace(
        model,
        "classification",
        subset_of_weights="lora",
        hessian_structure="kron",
        **opts,
    )


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _upstream(model: torch.nn.Module) -> Any:
    import laplace
    from laplace.curvature import CurvlinopsGGN

    return laplace.KronLaplace(model, "classification", backend=CurvlinopsGGN)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark and write ``bench_7b_shape.{json,md}``.

    Returns
    -------
    dict
        The result written to the json.
    """
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    model, train, test = build(args)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    tokens = sum(b["input_ids"].numel() for b in train)

    log("forward + backward (warm-up, then timed) ...")
    fwd_bwd(model, train)
    _, fb_s = timed(lambda: fwd_bwd(model, train), dev)
    log(f"forward + backward {fb_s:.2f} s")

    log("warm-up fit (one sequence, one LoRA module) ...")
    one = [{key: v[:1] for key, v in train[0].items()}]
    warm = _ours(model, args, lora_modules=re.compile(r"layers\.0\.self_attn\.q_proj$"))
    warm.fit(Loader(one))
    warm(one[0], link_approx="probit")
    float(warm.log_marginal_likelihood())
    del warm

    # ours, default low-rank factors, all layers
    la, ours = run_cell(lambda: _ours(model, args), train, test, dev, "ours low-rank")
    names = [w.name for w in la.lora_weights]
    ours["breakdown_bytes"] = factor_breakdown(la, names)
    threshold = la.lowrank.threshold
    k = la.lowrank.rank
    ours["lowrank_threshold"] = threshold
    ours["lowrank_rank"] = k
    ours["kept_ranks"] = sorted(
        {F.s.numel() for b in la.H_facs.kfacs for F in b if hasattr(F, "s")}
    )
    ours["short_factors"] = short_factors(la, names)
    del la
    gc.collect()

    # restricted fits: the cost of each block and of each module type
    restricted: dict[str, dict] = {"block": {}, "module": {}}
    if not args.no_breakdown:
        subsets = [
            ("block", str(i), rf"layers\.{i}\.", f"block {i}")
            for i in range(args.layers)
        ] + [("module", mod, rf"\.{mod}$", mod) for mod in MODULES]
        for group, key, pattern, label in subsets:
            pat = re.compile(pattern)
            la, cell = run_cell(
                lambda pat=pat: _ours(model, args, lora_modules=pat),
                train,
                test,
                dev,
                f"ours low-rank, {label}",
            )
            restricted[group][key] = cell
            del la
            gc.collect()

    # dense: run where it fits the budgets, else estimate
    log(f"timing eigh at sides {args.eigh_probe} ...")
    probe = eigh_probe(args.eigh_probe, dev)
    log(f"eigh probe {probe}")
    est = dense_estimate(args, probe, model_bytes)
    reason = (
        f"needs {est['need_bytes'] / GiB:.1f} GiB (model + dense factors + "
        f"eigenvectors) / {est['eighs']} eigh up to {est['largest_side']}^2 "
        f"(est. {est['eigh_s']:.0f} s)"
    )
    fits = (
        est["need_bytes"] <= args.dense_max_gib * GiB
        and est["eigh_s"] <= args.dense_max_s
    )
    dense: dict[str, dict] = {}
    contenders = {
        "ours dense (lowrank_threshold=None)": lambda: _ours(
            model, args, lowrank_threshold=None
        ),
        "laplace-torch KronLaplace + CurvlinopsGGN": lambda: _upstream(model),
    }
    for name, make in contenders.items():
        if args.dense == "skip" or (args.dense == "auto" and not fits):
            why = "skipped (--dense skip); " if args.dense == "skip" else ""
            dense[name] = {"not_run": f"not run: {why}{reason}"}
            log(f"{name}: not run: {reason}")
            continue
        try:
            la, cell = run_cell(make, train, test, dev, name)
            del la
        except Exception as exc:  # reported, e.g. out of memory
            cell = {"error": error_message(exc)}
        gc.collect()
        dense[name] = cell

    d, f, r, L = args.hidden, args.intermediate, args.lora_r, args.layers
    formula = factor_floats(d, f, r, k, L, threshold)
    formula_dense = factor_floats(d, f, r, 0, L, None)
    # a factor that kept k_i < k directions stores (k - k_i)(side + 1) fewer floats
    deficit = sum((k - x["rank"]) * (x["side"] + 1) for x in ours["short_factors"])
    check = {
        "formula_bytes": formula["total"] * 4,
        "measured_bytes": ours["factor_bytes"],
        "equal": formula["total"] * 4 == ours["factor_bytes"],
        "short_rank_bytes": deficit * 4,
        "equal_with_kept_ranks": (formula["total"] - deficit) * 4
        == ours["factor_bytes"],
        "per_module_formula_bytes": {m: formula[m] * 4 for m in MODULES},
        "per_module_measured_bytes": ours["breakdown_bytes"]["module"],
    }
    for c in dense.values():
        if "lml" in c:
            c["lml_rel_diff_vs_ours"] = abs(ours["lml"] - c["lml"]) / abs(c["lml"])
            c["formula_bytes"] = formula_dense["total"] * 4
    result = {
        "command": "python benchmarks/bench_7b_shape.py "
        + " ".join(argv or sys.argv[1:]),
        "machine": {
            "cpu": _cpu_name(),
            "cores": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "device": dev
            if not dev.startswith("cuda")
            else torch.cuda.get_device_name(dev),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        },
        "shape": {
            "hidden": d,
            "intermediate": f,
            "vocab": args.vocab,
            "layers": L,
            "heads": args.heads or max(1, d // 128),
            "lora_r": r,
            "classes": args.classes,
            "sequences": args.sequences,
            "tokens_per_sequence": args.tokens,
            "train_tokens": tokens,
            "batch_size": args.batch_size,
            "model_params": sum(p.numel() for p in model.parameters()),
            "lora_params": sum(
                p.numel() for p in model.parameters() if p.requires_grad
            ),
            "model_bytes": model_bytes,
        },
        "fwd_bwd_s": fb_s,
        "ours": ours,
        "restricted": restricted,
        "dense": dense,
        "dense_estimate": est,
        "eigh_probe": probe,
        "formula": formula_text(),
        "formula_check": check,
        "dense_formula_bytes": formula_dense["total"] * 4,
        "peak_rss_bytes": peak_rss_bytes(),
    }
    if dev.startswith("cuda"):
        result["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
    result["extrapolation"] = extrapolate(result, args)
    write_results(args.output, args.name, result, to_markdown(result))
    return result


def extrapolate(result: dict, args: argparse.Namespace) -> dict:
    """Per-layer costs times `target_layers`, and a full 7B fit's memory.

    Times per layer are the 2-layer times divided by the layers (the
    embedding lookup and the trimmed head cost next to nothing).

    Returns
    -------
    dict
    """
    L, T = args.layers, args.target_layers
    d, f, r, V = args.hidden, args.intermediate, args.lora_r, args.vocab
    ours = result["ours"]
    k = ours["lowrank_rank"]
    per = {
        key: ours[key] / L
        for key in ("fit_s", "marglik_s", "predict_s", "factor_bytes")
    }
    per["fwd_bwd_s"] = result["fwd_bwd_s"] / L
    rows = {key: v * T for key, v in per.items()}
    lowrank = factor_floats(d, f, r, k, T, ours["lowrank_threshold"])["total"] * 4
    dense = factor_floats(d, f, r, 0, T, None)["total"] * 4
    dense_vals = (14 * r + 11 * d + 3 * f) * T * 4
    weights = T * (4 * d * d + 3 * d * f + 2 * d) + 2 * V * d + d
    lora = T * r * (11 * d + 3 * f)
    est = result["dense_estimate"]
    dense_eigh_per_layer = est["eigh_s"] / L
    return {
        "target_layers": T,
        "per_layer": per,
        "total": rows,
        "dense_eigh_s_total": dense_eigh_per_layer * T,
        "gpu_bytes": {
            "model weights fp16/bf16": weights * 2,
            "model weights fp32": weights * 4,
            "LoRA weights + grads fp32": lora * 4 * 2,
            "ours factors": lowrank,  # formula at k: an upper bound
            "dense factors": dense,
            "dense held (factors + eigenvectors + eigenvalues)": 2 * dense + dense_vals,
        },
        "embedding_lm_head_bytes_fp32": 2 * V * d * 4,
    }


def _gib(b: float) -> str:
    return f"{b / GiB:.2f} GiB" if b >= GiB / 10 else f"{b / MiB:.1f} MiB"


def to_markdown(res: dict) -> str:
    """The results as markdown tables.

    Returns
    -------
    str
    """
    s, m, ours, ex = res["shape"], res["machine"], res["ours"], res["extrapolation"]
    fb = res["fwd_bwd_s"]
    lines = [
        "# 7B-shaped Laplace-LoRA (issue 17 item 4)",
        "",
        f"`{res['command']}`",
        "",
        f"Machine: {m['cores']} cores ({m['cpu']}), torch {m['torch']}, "
        f"{m['threads']} threads, device {m['device']}. Peak RSS "
        f"{_gib(res['peak_rss_bytes'])}.",
        "",
        f"Model: random-init Llama, d_model {s['hidden']}, d_ff {s['intermediate']}, "
        f"{s['heads']} heads, vocab {s['vocab']}, {s['layers']} layers, float32 "
        f"({s['model_params'] / 1e6:.0f} M params, {_gib(s['model_bytes'])}; lm_head "
        f"trimmed to {s['classes']} answer rows); LoRA r={s['lora_r']} on q, k, v, o, "
        f"gate, up, down ({s['lora_params'] / 1e6:.2f} M params); "
        f"{s['sequences']} sequences x {s['tokens_per_sequence']} tokens "
        f"({s['train_tokens']} tokens) in batches of {s['batch_size']}, "
        f"{s['classes']} classes; predictive on {s['batch_size']} sequences.",
        "",
        "## All layers",
        "",
        f"A plain forward + backward over the training batches: {fb:.2f} s.",
        "",
        "| contender | fit (s) | fit / fwd+bwd | marglik (s) | predictive probit "
        "(s) | factors | held (factors + eigen) | log marglik | evidence rel. diff "
        "to ours |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def row(name: str, c: dict) -> str:
        if "fit_s" not in c:
            return f"| {name} | {c.get('not_run') or c.get('error')} ||||||||"
        diff = c.get("lml_rel_diff_vs_ours")
        return (
            f"| {name} | {c['fit_s']:.2f} | {c['fit_s'] / fb:.2f}x | "
            f"{c['marglik_s']:.3f} | {c['predict_s']:.2f} | "
            f"{_gib(c['factor_bytes'])} | {_gib(c['held_bytes'])} | "
            f"{c['lml']:.4g} | {'' if diff is None else f'{diff:.1e}'} |"
        )

    lines.append(
        row(
            f"ours low-rank (threshold {ours['lowrank_threshold']}, "
            f"rank {ours['lowrank_rank']})",
            ours,
        )
    )
    for name, c in res["dense"].items():
        lines.append(row(name, c))
    est = res["dense_estimate"]
    lines += [
        "",
        f"Dense estimate at this shape: factors {_gib(est['factor_bytes'])}, model + "
        f"factors + eigenvectors {_gib(est['need_bytes'])}; {est['eighs']} eigh, "
        f"the largest {est['largest_side']}^2, est. {est['eigh_s']:.0f} s in all "
        f"(eigh float32 timed at sides {res['eigh_probe']['sizes']}: "
        + ", ".join(f"{t:.2f} s" for t in res["eigh_probe"]["seconds"])
        + f"; fitted exponent {res['eigh_probe']['exponent']:.2f}; extrapolated as "
        "n^3 from the largest).",
        "",
    ]
    rb = res["restricted"]
    if rb["block"] or rb["module"]:
        lines += [
            "## Per block and per LoRA module type (ours low-rank)",
            "",
            "Fits restricted with `lora_modules=` (each still runs the whole "
            "forward and backward); factors of the restricted fit.",
            "",
            "| restricted to | fit (s) | fit / fwd+bwd | marglik (s) | predictive (s) "
            "| factors |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for kind in ("block", "module"):
            for key, c in rb[kind].items():
                label = f"block {key}" if kind == "block" else f"{key} (all blocks)"
                lines.append(
                    f"| {label} | {c['fit_s']:.2f} | {c['fit_s'] / fb:.2f}x | "
                    f"{c['marglik_s']:.3f} | {c['predict_s']:.2f} | "
                    f"{_gib(c['factor_bytes'])} |"
                )
        lines.append("")
    per, tot, T = ex["per_layer"], ex["total"], ex["target_layers"]
    gb = ex["gpu_bytes"]
    lines += [
        f"## Extrapolated to {T} layers",
        "",
        f"Per layer = the {s['layers']}-layer value / {s['layers']} (the embedding "
        "lookup and the trimmed head cost next to nothing in time); memory of the "
        "embedding and an untrimmed lm_head: "
        f"{_gib(ex['embedding_lm_head_bytes_fp32'])} "
        "fp32 on top.",
        "",
        f"| quantity | per layer | {T} layers |",
        "|---|---:|---:|",
        f"| forward + backward (s) | {per['fwd_bwd_s']:.2f} | {tot['fwd_bwd_s']:.1f} |",
        f"| ours fit (s) | {per['fit_s']:.2f} | {tot['fit_s']:.1f} |",
        f"| ours marglik (s) | {per['marglik_s']:.4f} | {tot['marglik_s']:.2f} |",
        f"| ours predictive (s) | {per['predict_s']:.2f} | {tot['predict_s']:.1f} |",
        f"| ours factors (measured) | {_gib(per['factor_bytes'])} | "
        f"{_gib(tot['factor_bytes'])} |",
        f"| dense eigh only (est. s) | {ex['dense_eigh_s_total'] / T:.0f} | "
        f"{ex['dense_eigh_s_total']:.0f} |",
        f"| dense factors | {_gib(gb['dense factors'] / T)} | "
        f"{_gib(gb['dense factors'])} |",
        "",
        "## Memory of a 7B fit (formula)",
        "",
    ]
    for key, text in res["formula"].items():
        lines.append(f"- {key}: `{text}`")
    chk = res["formula_check"]
    lines += [
        "",
        f"Check at the measured shape: formula {chk['formula_bytes']} bytes, measured "
        f"{chk['measured_bytes']} bytes: "
        + ("equal." if chk["equal"] else "**differ**")
        + (
            ""
            if chk["equal"]
            else f" by {chk['short_rank_bytes']} bytes: the factors that kept "
            "fewer than k directions (the data spans fewer: "
            + ", ".join(
                f"{x['name'].replace('base_model.model.model.', '')} rank {x['rank']}"
                for x in ours["short_factors"]
            )
            + ") store (k - k_i)(side + 1) floats less each; with the kept ranks "
            + ("equal." if chk["equal_with_kept_ranks"] else "**still differ**.")
        )
        + f" (Low-rank factors kept ranks {ours['kept_ranks']}.)"
        + "".join(
            f" {name}: formula {c['formula_bytes']} bytes, measured "
            f"{c['factor_bytes']} bytes."
            for name, c in res["dense"].items()
            if "formula_bytes" in c
        ),
        "",
        f"With d={s['hidden']}, f={s['intermediate']}, r={s['lora_r']}, "
        f"k={ours['lowrank_rank']}, L={T}, V={s['vocab']}, b=4:",
        "",
        "| part | bytes |",
        "|---|---:|",
    ]
    for key, b in gb.items():
        lines.append(f"| {key} | {_gib(b)} |")
    base = gb["model weights fp16/bf16"] + gb["LoRA weights + grads fp32"]
    held = gb["dense held (factors + eigenvectors + eigenvalues)"]
    lines.append(f"| total, ours (fp16 weights) | {_gib(base + gb['ours factors'])} |")
    lines.append(f"| total, dense (fp16 weights) | {_gib(base + held)} |")
    lines += [
        "",
        "A GPU fit holds the weights, the LoRA weights and grads, the factors (dense:"
        " also their eigenvectors, and eigh workspace) and the activations of one "
        "batch.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
