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
