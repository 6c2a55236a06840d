"""Prior precision of a causal LM tuned on held-out text by its token NLL.

Tiny random Llama (vocabulary 64), LoRA on q and v, K-FAC EF posterior. The
reference for every loss is computed here from `next_token_predictive` and
the labels, position by position.
"""

from __future__ import annotations

import pytest
import torch
from helpers import lm_laplace, make_lm_batch, make_loader, make_peft_causal_lm

from laplace_lora_backend.token_validation import TokenValidation


@pytest.fixture()
def la_and_val():
    la = lm_laplace(make_peft_causal_lm(), prior_precision=1.0)
    la.fit(make_loader(make_lm_batch(n=6, T=6, seed=1), batch_size=3))
    val = [make_lm_batch(n=3, T=5, seed=s) for s in (5, 6)]
    return la, val


def _reference_nll(la, val, pred_type, K, prior):
    la.prior_precision = prior
    total, count = 0.0, 0
    for i, b in enumerate(val):
        x = {k: v for k, v in b.items() if k != "labels"}
        p = la.next_token_predictive(x, pred_type, K, torch.Generator().manual_seed(i))
        for (n, t), y in zip(
            torch.nonzero(b["labels"] != -100).tolist(),
            b["labels"][b["labels"] != -100].tolist(),
            strict=True,
        ):
            total -= float(p.probs[n, t, y].log())
            count += 1
    return total / count


@pytest.mark.parametrize("pred_type", ["glm", "nn"])
def test_token_loss_is_the_mean_nll_of_the_true_next_tokens(la_and_val, pred_type):
    la, val = la_and_val
    scorer = TokenValidation(la, val, pred_type, n_samples=4)
    got = scorer.loss(3.0)
    assert got == pytest.approx(_reference_nll(la, val, pred_type, 4, 3.0), rel=1e-10)
    assert scorer.loss(3.0) == got  # the same draws at every call
    assert scorer.map_loss() == pytest.approx(
        _reference_nll(la, val, "map", 1, 3.0), rel=1e-10
    )


def test_gridsearch_on_tokens_picks_the_grid_point_of_lowest_token_nll(la_and_val):
    la, val = la_and_val
    la.optimize_prior_precision(
        method="gridsearch", val_loader=val, pred_type="glm", n_samples=4,
        log_prior_prec_min=-1, log_prior_prec_max=3, grid_size=5,
    )  # fmt: skip
    chosen = float(la.prior_precision.flatten()[0])
    grid = torch.logspace(-1, 3, 5).tolist()
    losses = [_reference_nll(la, val, "glm", 4, p) for p in grid]
    assert chosen == pytest.approx(grid[min(range(5), key=losses.__getitem__)])
    # the grid discriminates: its losses are not all equal
    assert max(losses) - min(losses) > 1e-3


def test_auto_on_tokens_keeps_marglik_or_beats_map(la_and_val):
    la, val = la_and_val
    la.optimize_prior_precision(
        method="auto", val_loader=val, pred_type="glm", n_samples=4, trust_region=None
    )
    choice = la.prior_choice
    assert choice.method in ("marglik", "gridsearch", "map")
    assert choice.val_loss <= choice.val_loss_map
    prior = torch.tensor(choice.prior_precision, dtype=la.prior_precision.dtype)
    assert torch.equal(la.prior_precision.cpu().flatten(), prior.flatten())
    assert choice.val_loss_map == pytest.approx(
        _reference_nll(la, val, "map", 1, prior), rel=1e-10
    )
    if choice.method != "map":
        assert choice.val_loss == pytest.approx(
            _reference_nll(la, val, "glm", 4, prior), rel=1e-10
        )


def test_token_validation_names_missing_labels(la_and_val):
    la, val = la_and_val
    unlabelled = [{k: v for k, v in b.items() if k != "labels"} for b in val]
    with pytest.raises(ValueError, match="next-token labels"):
        TokenValidation(la, unlabelled)
    no_targets = [{**val[0], "labels": torch.full_like(val[0]["labels"], -100)}]
    with pytest.raises(ValueError, match="no position with a target"):
        TokenValidation(la, no_targets)


def test_token_tuning_reads_a_one_shot_iterator_once_and_refuses_a_custom_loss(
    la_and_val,
):
    la, val = la_and_val
    # only the first batch has targets: losing it would leave none
    no_targets = {**val[1], "labels": torch.full_like(val[1]["labels"], -100)}
    one_shot = iter([val[0], no_targets])
    la.optimize_prior_precision(
        method="gridsearch", val_loader=one_shot, pred_type="glm", n_samples=4,
        log_prior_prec_min=-1, log_prior_prec_max=3, grid_size=5,
    )  # fmt: skip
    from_list = float(la.prior_precision.flatten()[0])
    la.optimize_prior_precision(
        method="gridsearch", val_loader=[val[0], no_targets], pred_type="glm",
        n_samples=4, log_prior_prec_min=-1, log_prior_prec_max=3, grid_size=5,
    )  # fmt: skip
    assert float(la.prior_precision.flatten()[0]) == from_list
    with pytest.raises(ValueError, match="leave loss=None"):
        la.optimize_prior_precision(
            method="auto", val_loader=val, loss=lambda p, y: 0.0, trust_region=None
        )
