"""`laplace-lora demo --quick --model tiny` end to end (no GGUF load)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from laplace_lora_backend.cli import main
from laplace_lora_backend.demo import METHODS, DemoConfig, run_seed
from laplace_lora_backend.demo.data import load_dataset


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
            assert run["priors"][name]["method"] in {"marglik", "gridsearch", "map"}


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
def test_jacobians_cached_with_one_posterior_score_another(prior):
    """One Jacobian pass serves kron and diag posteriors over the same LoRA
    weights: `la(jb)` equals `la(x)` for both."""
    from laplace import Laplace

    from laplace_lora_backend import LoRAGGN
    from laplace_lora_backend.demo import build_model, make_splits
    from laplace_lora_backend.glm import jacobian_batches

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
    cache = jacobian_batches(las[0], splits["test"])
    got = []
    for la in las:
        la.prior_precision = prior
        expected = torch.cat(
            [la(b, pred_type="glm", link_approx="probit") for b in splits["test"]]
        )
        got.append(torch.cat([la(jb) for jb, _ in cache]))
        assert torch.allclose(got[-1], expected, rtol=1e-5, atol=1e-6)
    # the two posteriors differ, so the check above is not vacuous
    assert not torch.allclose(got[0], got[1])


def test_prior_modes_are_the_library_api():
    """'marglik' is optimize_prior_precision(), 'validation' its gridsearch
    and 'auto' its method='auto' on the validation Jacobians."""
    from laplace import Laplace

    from laplace_lora_backend.demo import build_model, make_splits, tune_prior
    from laplace_lora_backend.glm import jacobian_batches

    cfg = DemoConfig.quick_config(model="tiny", n_train=16, n_val=16)
    data = load_dataset("drugreview")
    model, tokenizer = build_model(cfg, data, 0)
    splits = make_splits(cfg, data, tokenizer, 0)
    la = Laplace(
        model, "classification", subset_of_weights="lora", hessian_structure="kron"
    )
    la.fit(splits["train"])
    val = jacobian_batches(la, splits["val"])

    m = tune_prior(la, val, "marglik")
    assert m["method"] == "marglik"
    la.optimize_prior_precision()
    assert la.prior_precision.tolist() == m["prior_precision"]

    v = tune_prior(la, val, "validation")
    la.optimize_prior_precision(method="gridsearch", val_loader=splits["val"])
    assert la.prior_precision.tolist() == pytest.approx(v["prior_precision"])

    a = tune_prior(la, val, "auto")
    assert a["method"] in {"marglik", "gridsearch", "map"}
    assert a["val_loss"] <= a["val_loss_map"] + 1e-12
    assert la.prior_precision.tolist() == pytest.approx(a["prior_precision"])
    with pytest.raises(ValueError, match="Unknown prior mode"):
        tune_prior(la, val, "grid")


def test_threads_follow_omp_num_threads_else_the_free_cores(monkeypatch):
    from laplace_lora_backend.demo.config import free_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert free_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    cores = len(os.sched_getaffinity(0))
    busy = {"n": 0.0}
    monkeypatch.setattr(
        "laplace_lora_backend.demo.config._busy_threads", lambda: busy["n"]
    )
    assert free_threads() == cores
    busy["n"] = cores + 5.0
    assert free_threads() == 1  # a busy machine: one thread, never zero
    monkeypatch.undo()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert 1 <= free_threads() <= cores  # the real reading
