"""Fit Laplace-LoRA data-parallel with torchrun (CPU/gloo or GPU/nccl).

    torchrun --nproc_per_node=2 examples/distributed_fit.py

Every rank builds the same PEFT model (in practice: loads the same fine-tuned
adapter), fits its shard of the data through a `DistributedSampler`, and ends
with the same posterior, the one a single process fits on all the data. Prior
tuning and predictions then need no communication. With `accelerate launch`
the process group is set up the same way: call `la.fit(loader)` on every
process with a loader that `accelerator.prepare` has sharded.

The model here is a tiny random-init Llama so the example runs anywhere in
seconds; use your own model and data the same way.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from laplace import Laplace
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from transformers import LlamaConfig, LlamaForCausalLM

import laplace_lora_backend  # noqa: F401  (registers subset_of_weights="lora")
from laplace_lora_backend.llm import AnswerTokenClassifier


def build_model(seed: int = 0) -> torch.nn.Module:
    """The same model on every rank (same seed / same checkpoint).

    Returns
    -------
    torch.nn.Module
        A tiny LoRA Llama reading 3 answer tokens, in eval mode.
    """
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    lm = get_peft_model(
        LlamaForCausalLM(cfg), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    return AnswerTokenClassifier(lm, [5, 6, 7]).eval()  # 3 answer tokens


def collate(rows):
    """(ids, label) pairs to a dict batch.

    Returns
    -------
    dict[str, torch.Tensor]
        ``input_ids`` `(batch, T)`, ``attention_mask`` `(batch, T)` (all ones)
        and ``labels`` `(batch,)`.
    """
    ids, labels = zip(*rows, strict=True)
    ids = torch.stack(ids)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.stack(labels),
    }


def main() -> None:
    """Fit on this rank's shard; every rank prints/holds the same posterior."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(
        f"cuda:{os.environ['LOCAL_RANK']}" if backend == "nccl" else "cpu"
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)

    g = torch.Generator().manual_seed(0)  # the same data set on every rank
    data = TensorDataset(
        torch.randint(0, 100, (64, 16), generator=g),
        torch.randint(0, 3, (64,), generator=g),
    )
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False)
    loader = DataLoader(data, batch_size=8, sampler=sampler, collate_fn=collate)

    model = build_model().to(device)
    la = Laplace(
        model, "classification", subset_of_weights="lora", hessian_structure="kron"
    )
    la.fit(loader)  # each rank: its shard; then the ranks combine their curvature
    la.optimize_prior_precision(method="marglik")  # local: no communication

    lml = la.log_marginal_likelihood().detach().reshape(1)
    every = [torch.zeros_like(lml) for _ in range(world)]
    dist.all_gather(every, lml)
    if rank == 0:
        print(
            f"{world} ranks, {la.n_data} examples fitted; log marginal likelihood "
            f"per rank: {[round(v.item(), 6) for v in every]}"
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
