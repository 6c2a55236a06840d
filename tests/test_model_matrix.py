"""The tiny-model matrix: every common family, PEFT setup and task.

GPT-2, RoBERTa, BERT, Llama, Mistral, Qwen2, OPT and Qwen2-MoE; LoRA on the
query / value projections or ``"all-linear"``; causal LMs read at answer
tokens, and ``task_type="SEQ_CLS"`` models (their head trained in full, in
the posterior). Every cell fits kron and diag posteriors on a padded batch,
and must equal the fit on each sequence alone without padding (evidence and
probit predictive, 1e-6), with predictions of padded inputs equal to those of
the unpadded ones.
"""

from __future__ import annotations

import pytest
import torch
from laplace import Laplace
from model_zoo import FAMILIES, build, padded_batch, sequences, single_batches

import laplace_lora_backend  # noqa: F401

CELLS = [
    (family, task, targets)
    for family, (_, causal, _, _) in FAMILIES.items()
    for task in ("causal", "seq_cls")
    if task == "seq_cls" or causal is not None
    for targets in ("qv", "all-linear")
]


def _inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


@pytest.mark.parametrize("structure", ["kron", "diag"])
@pytest.mark.parametrize("family, task, targets", CELLS)
def test_padded_fit_and_predictive_equal_the_unpadded_reference(
    family, task, targets, structure
):
    model, side = build(family, task, targets)
    seqs = sequences()
    padded = padded_batch(seqs, side)
    singles = single_batches(seqs)
    results = {}
    for name, loader in (("padded", [padded]), ("single", singles)):
        la = Laplace(
            model,
            "classification",
            subset_of_weights="lora",
            hessian_structure=structure,
            modules_to_save=True,
        )
        la.fit(loader, progress_bar=False)
        assert la.n_data == len(seqs)
        results[name] = (
            la.log_marginal_likelihood().detach(),
            la(_inputs(padded), pred_type="glm", link_approx="probit"),
        )
    kinds = {w.kind for w in la.lora_weights}
    assert {"A", "B"} <= kinds
    assert ("head" in kinds) == (task == "seq_cls")
    (lml, probs), (ref_lml, ref_probs) = results["padded"], results["single"]
    torch.testing.assert_close(lml, ref_lml, rtol=1e-6, atol=0)
    torch.testing.assert_close(probs, ref_probs, rtol=1e-6, atol=1e-9)
    unpadded = torch.cat(
        [la(_inputs(b), pred_type="glm", link_approx="probit") for b in singles]
    )
    torch.testing.assert_close(ref_probs, unpadded, rtol=1e-6, atol=1e-9)
