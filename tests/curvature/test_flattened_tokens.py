"""LoRA layers that see the batch's tokens flattened, `(batch * tokens, d)`.

OPT's `fc1` / `fc2` and Qwen2-MoE's shared expert receive flattened hidden
states. Their rows are mapped back to (example, token), so that padding is
masked and each sequence is one example: left and right padding give the
evidence and predictive of the unpadded examples fitted one at a time.
Layers whose rows cannot be mapped back raise, naming the layer and the fix.
"""

from __future__ import annotations

import pytest
import torch
from laplace import Laplace
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import OPTConfig, OPTForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

import laplace_lora_backend  # noqa: F401
from laplace_lora_backend.llm import AnswerTokenClassifier

VOCAB, LENGTHS, T = 40, (3, 5, 4, 6), 6


def _model(arch: str) -> nn.Module:
    torch.manual_seed(0)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    if arch == "opt":
        lm = OPTForCausalLM(
            OPTConfig(**common, ffn_dim=48, word_embed_proj_dim=32, dropout=0.0)
        )
    else:
        lm = Qwen2MoeForCausalLM(
            Qwen2MoeConfig(
                **common,
                intermediate_size=48,
                moe_intermediate_size=16,
                shared_expert_intermediate_size=24,
                num_experts=4,
                num_experts_per_tok=2,
                num_key_value_heads=2,
                experts_implementation="eager",  # grouped_mm has no float64
            )
        )
    config = LoraConfig(
        r=2, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False
    )
    return AnswerTokenClassifier(get_peft_model(lm, config), [3, 4, 5]).double()


def _examples() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(6, VOCAB, (n,), generator=g) for n in LENGTHS]


def _padded(side: str) -> dict[str, torch.Tensor]:
    seqs = _examples()
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        where = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        ids[i, where], mask[i, where] = s, 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.arange(4) % 3}


def _single() -> list[dict[str, torch.Tensor]]:
    return [
        {"input_ids": s[None], "attention_mask": torch.ones(1, len(s)).long(),
         "labels": torch.tensor([i % 3])}
        for i, s in enumerate(_examples())
    ]  # fmt: skip


@pytest.mark.parametrize("structure", ["kron", "diag"])
@pytest.mark.parametrize("arch", ["opt", "qwen2moe"])
def test_flattened_token_layers_equal_the_unpadded_per_example_fit(arch, structure):
    model = _model(arch)
    flat = [n for n, m in model.named_modules() if n.endswith(("fc1", "shared_expert"))]
    assert flat, "the model must have flattened-token LoRA layers"
    x = {k: v for k, v in _padded("left").items() if k != "labels"}
    results = {}
    for data in ("left", "right", "single"):
        la = Laplace(
            model,
            "classification",
            subset_of_weights="lora",
            hessian_structure=structure,
        )
        loader = _single() if data == "single" else [_padded(data)]
        la.fit(loader, progress_bar=False)
        assert la.n_data == 4
        results[data] = (
            la.log_marginal_likelihood().detach(),
            la(x, pred_type="glm", link_approx="probit"),
        )
    lml, probs = results["single"]
    for data in ("left", "right"):
        torch.testing.assert_close(results[data][0], lml, rtol=1e-6, atol=0)
        torch.testing.assert_close(results[data][1], probs, rtol=1e-6, atol=1e-9)


def test_a_float_attention_mask_maps_flattened_rows_too():
    model = _model("opt")
    batch = _padded("left")
    fits = []
    for mask in (batch["attention_mask"], batch["attention_mask"].float()):
        la = Laplace(model, "classification", subset_of_weights="lora")
        la.fit([{**batch, "attention_mask": mask}], progress_bar=False)
        fits.append(la.log_marginal_likelihood().detach())
    torch.testing.assert_close(fits[0], fits[1], rtol=1e-12, atol=0)


class _RealTokensOnly(nn.Module):
    """A layer applied to the real tokens only (packed), like a routed expert."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.packed = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, batch):
        h = self.emb(batch["input_ids"])
        keep = batch["attention_mask"].bool()
        h = h.masked_scatter(keep[..., None], self.packed(h[keep]))
        return self.head(h.mean(1))


def test_rows_that_cannot_be_mapped_back_name_the_layer_and_the_fix():
    torch.manual_seed(0)
    config = LoraConfig(r=2, target_modules=["packed", "head"], init_lora_weights=False)
    model = get_peft_model(_RealTokensOnly(), config).double()
    batch = _padded("left")
    la = Laplace(model, "classification", subset_of_weights="lora")
    with pytest.raises(ValueError, match=r"'.*packed.lora_A.*' received") as err:
        la.fit([batch], progress_bar=False)
    assert "cannot be mapped back" in str(err.value)
    assert "lora_modules" in str(err.value) and "target_modules" in str(err.value)
    la = Laplace(
        model, "classification", subset_of_weights="lora", lora_modules=["head"]
    )
    la.fit([batch], progress_bar=False)
    assert la.n_data == 4 and all("head" in w.name for w in la.lora_weights)
