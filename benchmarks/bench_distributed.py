"""Fit time with 1 vs 2 CPU processes (torch.distributed, gloo) on the same data.

One process fits the whole data set; then 2 spawned processes (1 thread each)
fit half each through a `DistributedSampler` and combine their curvature. The
time of a fit is taken between barriers on every rank (the slowest rank counts)
and includes the combination; medians over repeats after a warm-up. The script
also checks that both runs give the same log marginal likelihood.

Usage: ``python benchmarks/bench_distributed.py [--repeats 3] [--output DIR]``
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

WORKLOAD = dict(hidden=256, layers=4, n=64, tokens=64, batch=8, rank=8)


def build():
    """Tiny Llama (random init) with LoRA on q, v; data set; LoRAKronLaplace."""
    from laplace import Laplace
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import TensorDataset
    from transformers import LlamaConfig, LlamaForCausalLM

    import laplace_lora_backend  # noqa: F401
    from laplace_lora_backend.llm import AnswerTokenClassifier

    w = WORKLOAD
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=w["hidden"],
        intermediate_size=2 * w["hidden"],
        num_hidden_layers=w["layers"],
        num_attention_heads=8,
        num_key_value_heads=4,
    )
    lora = LoraConfig(r=w["rank"], target_modules=["q_proj", "v_proj"])
    model = AnswerTokenClassifier(
        get_peft_model(LlamaForCausalLM(cfg), lora), [5, 6, 7]
    ).eval()
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randint(0, 512, (w["n"], w["tokens"]), generator=g),
        torch.randint(0, 3, (w["n"],), generator=g),
    )

    def new_la():
        return Laplace(
            model,
            "classification",
            subset_of_weights="lora",
            hessian_structure="kron",
        )

    return data, new_la


def collate(rows):
    """(ids, label) pairs to a dict batch."""
    ids, labels = zip(*rows, strict=True)
    ids = torch.stack(ids)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.stack(labels),
    }


def timed_fits(rank: int, world: int, repeats: int) -> tuple[list[float], float]:
    """Fit `repeats + 1` times (first = warm-up); times and the final evidence."""
    from torch.utils.data import DataLoader, DistributedSampler

    data, new_la = build()
    sampler = (
        DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False)
        if world > 1
        else None
    )
    loader = DataLoader(
        data, batch_size=WORKLOAD["batch"], sampler=sampler, collate_fn=collate
    )
    times = []
    for _ in range(repeats + 1):
        la = new_la()
        torch.manual_seed(0)
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        la.fit(loader)
        if world > 1:
            dist.barrier()
        times.append(time.perf_counter() - t0)
    return times[1:], la.log_marginal_likelihood(prior_precision=1.0).item()


def worker(rank: int, init_file: str, repeats: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=600),
    )
    times, lml = timed_fits(rank, 2, repeats)
    torch.save({"times": times, "lml": lml}, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default="benchmarks/results")
    args = parser.parse_args()
    torch.set_num_threads(1)

    single, lml_single = timed_fits(0, 1, args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.get_context("spawn")
        procs = [
            ctx.Process(target=worker, args=(r, f"{tmp}/init", args.repeats, tmp))
            for r in range(2)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=1800)
        if any(p.exitcode != 0 for p in procs):
            raise SystemExit(f"a rank failed: exit codes {[p.exitcode for p in procs]}")
        ranks = [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(2)]
    two = [max(a, b) for a, b in zip(*(r["times"] for r in ranks), strict=True)]
    t1, t2 = statistics.median(single), statistics.median(two)
    lml_diff = max(abs(r["lml"] - lml_single) / abs(lml_single) for r in ranks)
    w = WORKLOAD
    md = "\n".join(
        [
            "### Data-parallel fit: 1 vs 2 CPU processes (gloo, 1 thread each)",
            "",
            f"Tiny Llama (hidden {w['hidden']}, {w['layers']} layers, LoRA r="
            f"{w['rank']} on q, v), {w['n']} sequences x {w['tokens']} tokens, "
            f"batch {w['batch']}, exact GGN K-FAC (default settings); median of "
            f"{args.repeats} fits after a warm-up; 2-process times are the slower "
            "rank's, including the combination of the curvature.",
            "",
            "| processes | fit (s) | speed-up |",
            "|---:|---:|---:|",
            f"| 1 | {t1:.2f} | 1.00x |",
            f"| 2 | {t2:.2f} | {t1 / t2:.2f}x |",
            "",
            f"Log marginal likelihood, max relative difference 2 vs 1 process: "
            f"{lml_diff:.1e} (float32).",
            "",
            "Command: `python benchmarks/bench_distributed.py --repeats "
            f"{args.repeats}`",
        ]
    )
    payload = {
        "workload": w,
        "repeats": args.repeats,
        "single_s": single,
        "two_process_s": two,
        "speedup": t1 / t2,
        "lml_rel_diff": lml_diff,
        "torch": torch.__version__,
        "cores": os.cpu_count(),
    }
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "distributed.json").write_text(json.dumps(payload, indent=2))
    (out / "distributed.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
