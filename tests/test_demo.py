"""`laplace-lora demo --quick --model tiny` end to end (no GGUF load)."""

from __future__ import annotations

import json

import pytest
import torch

from laplace_lora_backend.cli import main
from laplace_lora_backend.demo import METHODS, DemoConfig, run_seed
from laplace_lora_backend.llm.data import load_dataset


def test_quick_demo_writes_consistent_table_json_and_png(tmp_path):
    main(
        [
            "demo",
            "--quick",
            "--model",
            "tiny",
            "--threads",
            "1",
            "--seeds",
            "0",
            "1",
            "--output",
            str(tmp_path),
        ]
    )
    name = "demo_drugreview_tiny"
    result = json.loads((tmp_path / f"{name}.json").read_text())
    assert (tmp_path / f"{name}.png").stat().st_size > 10_000
    table = (tmp_path / f"{name}.md").read_text()
    assert [len(result["seeds"]), result["config"]["quick"]] == [2, True]
    for m in METHODS:
        assert f"| {m} |" in table
        for run in result["seeds"]:
            metrics = run[m]
            assert set(metrics) == {"acc", "ece", "nll", "brier"}
            assert 0 <= metrics["ece"] <= 1 and 0 <= metrics["acc"] <= 1
            assert 0 <= metrics["brier"] <= 2 and metrics["nll"] >= 0
        mean = sum(r[m]["nll"] for r in result["seeds"]) / 2
        assert result[m]["nll"] == pytest.approx(mean)
        assert result["mean"][m] == result[m]
    for run in result["seeds"]:
        for name in ("LLLA", "LA", "LA-diag"):
            assert run["priors"][name]["method"] in {
                "marglik",
                "validation",
                "fallback-to-MAP",
            }


def test_every_method_returns_probabilities():
    cfg = DemoConfig.quick_config(model="tiny", threads=1)
    run = run_seed(cfg, load_dataset("drugreview"), 0, log=lambda *a: None)
    for m in METHODS:
        p = torch.tensor(run["probs"][m])
        assert p.shape == (cfg.n_test, 3) and torch.isfinite(p).all()
        assert torch.allclose(
            p.sum(1), torch.ones(cfg.n_test, dtype=p.dtype), atol=1e-5
        )


@pytest.mark.parametrize("prior", [0.5, 20.0])
def test_glm_cache_equals_laplace_probit_for_kron_and_diag(prior):
    """One Jacobian pass scores kron and diag posteriors as `la(x)` would."""
    from laplace import Laplace

    from laplace_lora_backend import LoRAGGN
    from laplace_lora_backend.demo import GLMCache, build_model, make_splits

    cfg = DemoConfig.quick_config(model="tiny", n_train=16, n_val=8, n_test=16)
    data = load_dataset("drugreview")
    model, tokenizer = build_model(cfg, data, 0)
    splits = make_splits(cfg, data, tokenizer, 0)
    las = []
    for structure in ("kron", "diag"):
        la = Laplace(
            model,
            "classification",
            subset_of_weights="lora",
            hessian_structure=structure,
            backend=LoRAGGN,
        )
        la.fit(splits["train"])
        las.append(la)
    cache = GLMCache(las[0], splits["test"])
    for la in las:
        la.prior_precision = prior
        expected = torch.cat(
            [la(b, pred_type="glm", link_approx="probit") for b in splits["test"]]
        )
        got = cache.probs(prior, la)
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
    # the two posteriors differ, so the check above is not vacuous
    assert not torch.allclose(cache.probs(prior, las[0]), cache.probs(prior, las[1]))


def test_prior_modes_marglik_validation_and_auto():
    """'marglik' keeps the evidence optimum, 'validation' the grid value with
    the lowest validation NLL (or MAP's predictive if none beats MAP), and
    'auto' one of the two by the validation check."""
    from laplace import Laplace

    from laplace_lora_backend.demo import (
        GLMCache,
        _nll,
        build_model,
        make_splits,
        tune_prior,
    )
    from laplace_lora_backend.llm.finetune import predict_logits

    cfg = DemoConfig.quick_config(model="tiny", n_train=16, n_val=16)
    data = load_dataset("drugreview")
    model, tokenizer = build_model(cfg, data, 0)
    splits = make_splits(cfg, data, tokenizer, 0)
    la = Laplace(
        model, "classification", subset_of_weights="lora", hessian_structure="kron"
    )
    la.fit(splits["train"])
    val = GLMCache(la, splits["val"])
    map_nll = _nll(predict_logits(model, splits["val"]).softmax(-1), val.labels)
    quiet = lambda *a: None  # noqa: E731

    m = tune_prior(la, val, map_nll, quiet, "marglik")
    assert m["method"] == "marglik"
    assert la.prior_precision.tolist() == m["marglik_prior"]

    v = tune_prior(la, val, map_nll, quiet, "validation")
    grid = torch.logspace(-4, 6, 31, dtype=la._dtype)
    scores = [_nll(val.probs(p, la), val.labels) for p in grid]
    if v["method"] == "validation":
        assert v["prior_precision"] == pytest.approx(
            float(grid[int(torch.tensor(scores).argmin())])
        )
        assert v["val_nll"] == pytest.approx(min(scores)) and min(scores) <= map_nll
    else:
        assert v["method"] == "fallback-to-MAP" and min(scores) > map_nll

    a = tune_prior(la, val, map_nll, quiet, "auto")
    expected = "marglik" if a["val_nll_marglik"] <= map_nll else v["method"]
    assert a["method"] == expected
    with pytest.raises(ValueError, match="Unknown prior mode"):
        tune_prior(la, val, map_nll, quiet, "grid")
