"""Models and data of the benchmark sections.

Every workload is a PEFT LoRA model whose base weights are frozen (so that
laplace-torch's ``subset_of_weights="all"`` selects exactly the LoRA weights),
batches of training data and one test batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from laplace_lora_backend.demo.data import load_dataset, tokenize_prompts
from laplace_lora_backend.demo.smollm2 import load_smollm2
from laplace_lora_backend.llm.answer_tokens import (
    AnswerTokenClassifier,
    answer_token_ids,
    trim_lm_head,
)

__all__ = ["Workload", "tiny_lm", "smollm2", "wide_layer", "many_outputs"]

Batch = dict[str, torch.Tensor]


@dataclass
class Workload:
    """A model with LoRA layers and its data.

    Attributes
    ----------
    name : str
    model : torch.nn.Module
        ``model(batch)`` returns `(batch, C)` logits.
    train : list[dict]
        Training batches (``input_ids``, ``attention_mask``, ``labels``).
    test : dict
        One test batch.
    meta : dict
        Sizes, for the report.
    """

    name: str
    model: nn.Module
    train: list[Batch]
    test: Batch
    meta: dict[str, Any] = field(default_factory=dict)

    def to(self, device: str | torch.device) -> Workload:
        """Move the model and every batch to `device` (in place).

        Returns
        -------
        Workload
            This workload.
        """
        self.model.to(device)
        self.train = [{k: v.to(device) for k, v in b.items()} for b in self.train]
        self.test = {k: v.to(device) for k, v in self.test.items()}
        return self


class Loader(list):
    """Batches with the `.dataset` length laplace-torch reads."""

    def __init__(self, batches: list[Batch]) -> None:
        super().__init__(batches)
        self.dataset = range(sum(len(b["labels"]) for b in batches))


def _random_batches(
    n: int, tokens: int, vocab: int, C: int, batch_size: int, seed: int
) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, tokens), generator=g)
    y = torch.randint(0, C, (n,), generator=g)
    mask = torch.ones_like(ids)
    return [
        {
            "input_ids": ids[i : i + batch_size],
            "attention_mask": mask[i : i + batch_size],
            "labels": y[i : i + batch_size],
        }
        for i in range(0, n, batch_size)
    ]


def tiny_lm(
    arch: str = "llama",
    hidden: int = 256,
    layers: int = 4,
    n: int = 32,
    tokens: int = 64,
    C: int = 3,
    vocab: int = 512,
    batch_size: int = 8,
    seed: int = 0,
) -> Workload:
    """Random-init Llama or GPT-2 with LoRA r=8 on the attention inputs.

    The outputs are the logits of `C` answer tokens at the last position
    (`AnswerTokenClassifier`, lm_head frozen).

    Returns
    -------
    Workload
        `n` random training sequences of `tokens` tokens in batches of
        `batch_size`, and one random test batch.

    Raises
    ------
    ValueError
        If `arch` is neither ``"llama"`` nor ``"gpt2"``.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=8,
            num_key_value_heads=4,
            attn_implementation="eager",
        )
        lm, targets = LlamaForCausalLM(cfg), ["q_proj", "v_proj"]
    elif arch == "gpt2":
        cfg = GPT2Config(
            vocab_size=vocab,
            n_embd=hidden,
            n_layer=layers,
            n_head=8,
            n_positions=max(tokens, 64),
            attn_implementation="eager",
        )
        lm, targets = GPT2LMHeadModel(cfg), ["c_attn"]
    else:
        raise ValueError(f"Unknown arch {arch!r}; use 'llama' or 'gpt2'.")
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0)
    peft_lm = get_peft_model(lm, lora)
    with torch.no_grad():  # B = 0 at init would make the GGN of A vanish
        for name, p in peft_lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    model = AnswerTokenClassifier(peft_lm, list(range(C))).eval()
    train = _random_batches(n, tokens, vocab, C, batch_size, seed)
    test = _random_batches(batch_size, tokens, vocab, C, batch_size, seed + 1)[0]
    meta = {"hidden": hidden, "layers": layers, "n": n, "tokens": tokens, "C": C}
    name = f"tiny {arch} (h={hidden}, {layers} layers, {n} x {tokens} tokens)"
    return Workload(name, model, train, test, meta)


def smollm2(
    n: int = 64,
    max_length: int = 48,
    batch_size: int = 8,
    targets: tuple[str, ...] = ("q_proj", "v_proj", "lm_head"),
    dataset: str = "drugreview",
) -> Workload:
    """SmolLM2-135M-Instruct with LoRA (r=8) on `targets`, real reviews / news.

    The default is the suite's workload: LoRA on q, v and the trimmed lm_head,
    drug reviews (3 classes); ``dataset="bbcnews"`` gives 5 classes.

    Returns
    -------
    Workload
        The first `n` training examples in batches of `batch_size`, and
        `batch_size` test examples (prompts of about `max_length` tokens).
    """
    from peft import LoraConfig, get_peft_model

    data = load_dataset(dataset)
    lm, tokenizer = load_smollm2()
    ids = answer_token_ids(data.answers, tokenizer)
    trim_lm_head(lm, ids)
    torch.manual_seed(0)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=list(targets))
    model = AnswerTokenClassifier(get_peft_model(lm, lora), ids).eval()
    enc = tokenize_prompts(data, data.train[:n], tokenizer, max_length)
    train = [
        {k: v[i : i + batch_size] for k, v in enc.items()}
        for i in range(0, n, batch_size)
    ]
    test = tokenize_prompts(data, data.test[:batch_size], tokenizer, max_length)
    C = len(data.answers)
    meta = {"n": n, "tokens": max_length, "C": C, "targets": list(targets)}
    where = ",".join(t.removesuffix("_proj") for t in targets)
    return Workload(
        f"SmolLM2-135M, LoRA {where} ({n} {dataset} x {max_length} tokens, C={C})",
        model,
        train,
        test,
        meta,
    )


class _WideLayer(nn.Module):
    """A LoRA-wrapped `d -> 64` linear, tanh, token mean, frozen `64 -> C` head.

    The LoRA input factor is `d x d`; the frozen base weight is only `64 x d`,
    so memory measures the curvature, not the model.
    """

    def __init__(self, d: int, C: int, out: int = 64) -> None:
        super().__init__()
        self.proj = nn.Linear(d, out, bias=False)
        self.head = nn.Linear(out, C, bias=False)

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.head(torch.tanh(self.proj(batch["input_ids"])).mean(1))


def wide_layer(
    d: int, n: int = 32, tokens: int = 16, C: int = 3, batch_size: int = 8
) -> Workload:
    """One LoRA layer of width `d` (the width sweep).

    Returns
    -------
    Workload
        `n` random `(tokens, d)` inputs in batches of `batch_size`, and one
        test batch of `batch_size`.
    """
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["proj"])
    model = get_peft_model(_WideLayer(d, C), lora).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    g = torch.Generator().manual_seed(0)
    # inputs with a decaying spectrum, as real activations have
    scales = torch.logspace(0, -2, d)
    x = torch.randn(n + batch_size, tokens, d, generator=g) * scales
    y = torch.randint(0, C, (n + batch_size,), generator=g)
    train = [
        {"input_ids": x[i : i + batch_size], "labels": y[i : i + batch_size]}
        for i in range(0, n, batch_size)
    ]
    test = {"input_ids": x[n:], "labels": y[n:]}
    return Workload(f"one LoRA layer, width {d}", model, train, test, {"d": d})


def many_outputs(
    C: int, n: int = 16, tokens: int = 16, batch_size: int = 8
) -> Workload:
    """2-layer toy Llama (hidden 64) reading `C` answer tokens (outputs sweep).

    Returns
    -------
    Workload
        A `tiny_lm` workload.
    """
    return tiny_lm(
        "llama",
        hidden=64,
        layers=2,
        n=n,
        tokens=tokens,
        C=C,
        vocab=max(2048, C + 8),
        batch_size=batch_size,
    )
