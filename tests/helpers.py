"""Tiny random-init PEFT models, batches and dense references for the tests."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
from laplace import Laplace
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.utils.data import DataLoader, Dataset
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from laplace_lora_backend import LoRAEF
from laplace_lora_backend.curvature.token_loss import next_token_labels

torch.set_num_threads(1)

VOCAB = 40
N_CLASSES = 3


class LastTokenHead(nn.Module):
    """Test wrapper: logits of the first `n_out` vocabulary entries at the last
    position of a causal LM (left padding, position ids from the mask)."""

    def __init__(self, lm: nn.Module, n_out: int = N_CLASSES):
        super().__init__()
        self.lm = lm
        self.n_out = n_out

    def forward(self, batch):
        if isinstance(batch, torch.Tensor):
            batch = {"input_ids": batch}
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        # Additive 4D mask: causal, padding keys hidden, every query sees at
        # least itself. (transformers' own float64 eager mask overflows to -inf
        # on the padding rows and turns the whole batch into NaN.)
        T = ids.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        allowed = causal & (mask.bool()[:, None, None, :] | torch.eye(T).bool())
        dtype = next(self.lm.parameters()).dtype
        mask4 = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, -1e30)
        out = self.lm(input_ids=ids, attention_mask=mask4, position_ids=pos)
        return out.logits[:, -1, : self.n_out]


def make_lm(arch: str, seed: int = 0, vocab: int = VOCAB) -> nn.Module:
    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            attn_implementation="eager",
        )
        lm = LlamaForCausalLM(cfg)
        targets = ["q_proj", "v_proj"]
    elif arch == "gpt2":
        cfg = GPT2Config(
            vocab_size=vocab,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            attn_implementation="eager",
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        lm = GPT2LMHeadModel(cfg)
        targets = ["c_attn"]
    elif arch in ("gemma2-softcap", "gemma2"):
        # gemma2-softcap: logits = 30 tanh(lm_head(h) / 30); both soft-cap
        # the attention scores (50 tanh(s / 50), Gemma-2's default)
        cfg = Gemma2Config(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=64,
            final_logit_softcapping=30.0 if arch == "gemma2-softcap" else None,
            attn_implementation="eager",
        )
        lm = Gemma2ForCausalLM(cfg)
        targets = ["q_proj", "v_proj"]
    else:
        raise ValueError(arch)
    return lm, targets


def make_peft_classifier(
    arch: str = "llama",
    seed: int = 0,
    r: int = 4,
    targets: list[str] | None = None,
    n_out: int = N_CLASSES,
) -> nn.Module:
    """Tiny PEFT LoRA classifier in float64 with non-zero LoRA B weights."""
    lm, default_targets = make_lm(arch, seed)
    peft_model = _with_lora(lm, seed, r, targets or default_targets)
    model = LastTokenHead(peft_model, n_out).double().eval()
    return model


def _with_lora(lm: nn.Module, seed: int, r: int, targets: list[str]) -> nn.Module:
    """PEFT LoRA (no dropout) on `targets`, with LoRA B weights drawn N(0, 0.3^2)."""
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, lora_dropout=0.0)
    peft_model = get_peft_model(lm, cfg)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return peft_model


def make_peft_causal_lm(
    seed: int = 0,
    r: int = 2,
    targets: list[str] | None = None,
    vocab: int = 64,
    arch: str = "llama",
) -> nn.Module:
    """Tiny PEFT LoRA causal LM (Llama by default; float64, eager attention,
    vocabulary 64) with non-zero LoRA B weights; called as
    ``model(**batch).logits``."""
    lm, default_targets = make_lm(arch, seed, vocab=vocab)
    return _with_lora(lm, seed, r, targets or default_targets).double().eval()


def lm_laplace(model: nn.Module, hessian_structure: str = "kron", **kwargs):
    """Unfitted LoRA Laplace of a causal LM with the empirical Fisher."""
    return Laplace(
        model,
        "classification",
        subset_of_weights="lora",
        hessian_structure=hessian_structure,
        backend=LoRAEF,
        **kwargs,
    )


def make_lm_batch(n: int = 4, T: int = 6, seed: int = 0, vocab: int = 64):
    """Dict batch with right padding (example i has i % 3 padding tokens) and
    next-token labels aligned with the logits. (Left padding in float64 makes
    transformers' eager mask overflow to NaN on the padding rows.)"""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, T), generator=g)
    mask = torch.ones(n, T, dtype=torch.long)
    for i in range(n):
        mask[i, T - i % 3 :] = 0
        ids[i, T - i % 3 :] = 0
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": next_token_labels(ids, mask),
    }


def make_batch(
    n: int = 6, T: int = 5, seed: int = 0, pad: bool = True, n_out=N_CLASSES
):
    """Dict batch with left padding (example i has i % 3 padding tokens)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, T), generator=g)
    mask = torch.ones(n, T, dtype=torch.long)
    if pad:
        for i in range(n):
            k = i % 3
            mask[i, :k] = 0
            ids[i, :k] = 0
    y = torch.randint(0, n_out, (n,), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": y}


class DictDataset(Dataset):
    def __init__(self, batch):
        self.batch = batch

    def __len__(self):
        return len(self.batch["labels"])

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.batch.items()}


def make_loader(batch, batch_size: int = 3) -> DataLoader:
    return DataLoader(DictDataset(batch), batch_size=batch_size, shuffle=False)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference relative to the max abs of the reference `b`."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def brute_force_jacobians(model, weights, x):
    """Jacobians `(batch, outputs, P)` of `model(x)` w.r.t. the LoRA weights by
    torch.func (reverse mode), in the order of `weights`."""
    names = [w.name for w in weights]
    params = {w.name: w.param.detach() for w in weights}

    def f(p):
        return torch.func.functional_call(model, p, (x,), strict=False)

    jac = torch.func.jacrev(f)(params)
    out = f(params)
    B, C = out.shape
    return torch.cat([jac[n].reshape(B, C, -1) for n in names], dim=-1), out


def brute_force_ggn(model, weights, x, likelihood="classification"):
    """Dense GGN `sum_n J_n^T H_n J_n`, `(P, P)`, with laplace-torch's factor
    (H = diag(p) - p p^T for classification, H = I for regression)."""
    J, f = brute_force_jacobians(model, weights, x)
    if likelihood == "classification":
        p = f.softmax(-1)
        H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    else:
        H = torch.eye(f.shape[1], dtype=f.dtype).expand(f.shape[0], -1, -1)
    return torch.einsum("bcp,bck,bkq->pq", J, H, J)
