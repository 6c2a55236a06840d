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
from model_zoo import VOCAB, build, padded_batch, sequences, single_batches
from peft import LoraConfig, get_peft_model
from torch import nn

import laplace_lora_backend  # noqa: F401


def _model(arch: str) -> nn.Module:
    return build(arch, "causal", "all-linear")[0]


def _padded(side: str) -> dict[str, torch.Tensor]:
    return padded_batch(sequences(), side)


def _single() -> list[dict[str, torch.Tensor]]:
    return single_batches(sequences())


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
