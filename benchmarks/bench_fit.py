"""K-FAC fit cost of our LoRA backend vs laplace-torch's backends, one process.

For each workload every contender computes the Kronecker-factored curvature of
the same LoRA weights over the same batches (laplace-torch `KronLaplace` with
``subset_of_weights="all"`` on the frozen-base PEFT model, i.e. exactly the LoRA
weights). Times are medians over repeats after a warm-up, and are reported as a
ratio to one plain forward+backward pass over the same data (the floor for an
EF / MC Fisher is 1.0x). The eigendecomposition at the end of `fit` is the same
`laplace.utils.Kron.decompose` for every contender and is reported once.

Usage: ``python benchmarks/bench_fit.py [--repeats 3] [--output benchmarks/results]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from common import run_meta, write_results  # noqa: E402
from laplace import KronLaplace  # noqa: E402
from laplace.curvature import (  # noqa: E402
    AsdlEF,
    AsdlGGN,
    CurvlinopsEF,
    CurvlinopsGGN,
)
from peft import LoraConfig, get_peft_model  # noqa: E402
from torch import nn  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import laplace_lora_backend  # noqa: E402, F401
from laplace_lora_backend import LoRAEF, LoRAGGN  # noqa: E402

hf_logging.set_verbosity_error()
N_CLASSES = 3
DEVICE = torch.device("cpu")


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


class LastToken(nn.Module):
    """Logits of the first C vocabulary entries at the last position."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, batch):
        out = self.lm(input_ids=batch["input_ids"], logits_to_keep=1)
        return out.logits[:, -1, :N_CLASSES]


class WideLayer(nn.Module):
    """One LoRA-wrapped `d x d` linear on `(batch, tokens, d)` inputs, mean over
    tokens, then a frozen `d -> C` head."""

    def __init__(self, d: int):
        super().__init__()
        self.proj = nn.Linear(d, d, bias=False)
        self.head = nn.Linear(d, N_CLASSES, bias=False)

    def forward(self, batch):
        return self.head(torch.tanh(self.proj(batch["input_ids"])).mean(1))


def tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        attn_implementation="eager",
    )
    lm = get_peft_model(
        LlamaForCausalLM(cfg),
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    )
    model = LastToken(lm).eval().to(DEVICE)
    data = [
        {
            "input_ids": torch.randint(0, 512, (64,), device=DEVICE),
            "labels": torch.randint(0, N_CLASSES, (), device=DEVICE),
        }
        for _ in range(32)
    ]
    return "tiny Llama (h=256, 4 layers, LoRA r=8 q,v; 32 x 64 tokens)", model, data


def wide_layer(d: int = 4096):
    torch.manual_seed(0)
    base = WideLayer(d)
    model = (
        get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["proj"]))
        .eval()
        .to(DEVICE)
    )
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    data = [
        {
            "input_ids": torch.randn(16, d, device=DEVICE) / d**0.5,
            "labels": torch.randint(0, N_CLASSES, (), device=DEVICE),
        }
        for _ in range(32)
    ]
    return f"one LoRA layer {d}x{d} (r=8; 32 x 16 tokens)", model, data


def loader(data, batch_size=8):
    return torch.utils.data.DataLoader(data, batch_size=batch_size)


def fwd_bwd(model, data):
    lossfunc = nn.CrossEntropyLoss(reduction="sum")
    for batch in loader(data):
        loss = lossfunc(model(batch), batch["labels"])
        loss.backward()
    model.zero_grad(set_to_none=True)


CONTENDERS = {
    "ours LoRAGGN (exact GGN)": (LoRAGGN, {}),
    "ours LoRAGGN (MC, 1 sample)": (LoRAGGN, {"stochastic": True}),
    "ours LoRAEF": (LoRAEF, {}),
    "laplace CurvlinopsGGN": (CurvlinopsGGN, {}),
    "laplace CurvlinopsEF": (CurvlinopsEF, {}),
    "laplace AsdlGGN": (AsdlGGN, {}),
    "laplace AsdlEF": (AsdlEF, {}),
}


def curvature_pass(model, data, backend_cls, backend_kwargs):
    la = KronLaplace(
        model, "classification", backend=backend_cls, backend_kwargs=backend_kwargs
    )
    N = len(data)
    H = None
    for batch in loader(data):
        _, Hb = la._curv_closure(batch, batch["labels"], N)
        H = Hb if H is None else H + Hb
    return H


def timed_pair(fn, base, repeats):
    """Median seconds of `fn` and median ratio to `base`, alternating the two
    in every repeat so that machine drift cancels in the ratio."""
    fn(), base()  # warm-up
    times, ratios = [], []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        base()
        sync()
        t1 = time.perf_counter()
        fn()
        sync()
        t2 = time.perf_counter()
        times.append(t2 - t1)
        ratios.append((t2 - t1) / (t1 - t0))
    return statistics.median(times), statistics.median(ratios)


def run_workload(make, repeats):
    title, model, data = make()

    def base():
        fwd_bwd(model, data)

    base_times = []
    rows = []
    for name, (cls, kwargs) in CONTENDERS.items():
        try:
            t, ratio = timed_pair(
                lambda c=cls, k=kwargs: curvature_pass(model, data, c, k),
                base,
                repeats,
            )
            rows.append({"contender": name, "seconds": t, "ratio": ratio})
            base_times.append(t / ratio)
        except Exception as exc:  # reported, not dropped
            msg = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            rows.append({"contender": name, "error": msg})
        print(f"  {name:30s} {rows[-1]}", flush=True)
    H = curvature_pass(model, data, LoRAGGN, {})
    sync()
    t0 = time.perf_counter()
    H.decompose()
    sync()
    t_decompose = time.perf_counter() - t0
    factor_bytes = sum(F.numel() * F.element_size() for b in H.kfacs for F in b)
    return {
        "workload": title,
        "fwd_bwd_seconds": statistics.median(base_times),
        "decompose_seconds": t_decompose,
        "dense_factor_bytes": factor_bytes,
        "rows": rows,
    }


def to_markdown(results, meta):
    lines = [
        "# K-FAC fit cost: ours vs laplace-torch backends",
        "",
        f"Generated by `{meta['command']}` on {meta['machine']}, "
        f"torch {meta['torch']}, {meta['threads']} thread(s); median of "
        f"{meta['repeats']} runs after a warm-up. Ratio = curvature pass time / one "
        "plain forward+backward pass over the same data (median of per-repeat "
        "ratios, the two runs alternating).",
        "",
    ]
    for res in results:
        lines += [
            f"## {res['workload']}",
            "",
            f"forward+backward: {res['fwd_bwd_seconds']:.3f} s; "
            f"Kron.decompose (same for all): {res['decompose_seconds']:.3f} s; "
            f"dense factors: {res['dense_factor_bytes'] / 2**20:.1f} MiB",
            "",
            "| contender | seconds | x fwd+bwd |",
            "|---|---:|---:|",
        ]
        for r in res["rows"]:
            if "error" in r:
                lines.append(f"| {r['contender']} | failed | {r['error']} |")
            else:
                lines.append(
                    f"| {r['contender']} | {r['seconds']:.3f} | {r['ratio']:.2f} |"
                )
        lines.append("")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default="benchmarks/results")
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--suffix", default="", help="appended to result names")
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    torch.set_num_threads(args.threads)
    meta = run_meta("bench_fit.py", args, DEVICE)
    results = []
    for make in (tiny_llama, lambda: wide_layer(args.width)):
        res = run_workload(make, args.repeats)
        print(res["workload"], f"fwd+bwd {res['fwd_bwd_seconds']:.3f}s", flush=True)
        results.append(res)
    write_results(
        args.output,
        f"fit{args.suffix}",
        {"meta": meta, "results": results},
        to_markdown(results, meta),
    )


if __name__ == "__main__":
    main()
