"""`benchmarks/bench_7b_shape.py` end to end at a tiny shape: keys and the formula."""

from __future__ import annotations

import json

from benchmarks.bench_7b_shape import MODULES, factor_floats, main


def test_tiny_7b_shape_run_matches_the_memory_formula(tmp_path):
    result = main(
        [
            "--hidden", "64",
            "--intermediate", "128",
            "--vocab", "256",
            "--tokens", "16",
            "--lora-r", "4",
            "--lowrank-threshold", "100",  # d_ff sides low-rank, d_model dense
            "--lowrank-rank", "8",
            "--eigh-probe", "32", "64",
            "--output", str(tmp_path),
        ]
    )  # fmt: skip
    saved = json.loads((tmp_path / "bench_7b_shape.json").read_text())
    md = (tmp_path / "bench_7b_shape.md").read_text()
    assert saved["formula_check"] == result["formula_check"]
    for key in ("fwd_bwd_s", "ours", "restricted", "dense", "formula", "extrapolation"):
        assert key in saved, key
    ours = saved["ours"]
    for key in ("fit_s", "marglik_s", "predict_s", "factor_bytes", "held_bytes"):
        assert ours[key] > 0, key
    assert ours["lowrank_threshold"] == 100 and ours["kept_ranks"] == [8]
    # the formula is the measured factor bytes, in total and per module type
    check = saved["formula_check"]
    assert check["equal"] and check["formula_bytes"] == ours["factor_bytes"]
    assert check["equal_with_kept_ranks"] and ours["short_factors"] == []
    assert check["per_module_formula_bytes"] == check["per_module_measured_bytes"]
    assert set(saved["restricted"]["block"]) == {"0", "1"}
    assert set(saved["restricted"]["module"]) == set(MODULES)
    # dense contenders are cheap here: run, and their factors match the formula
    for cell in saved["dense"].values():
        assert cell["factor_bytes"] == cell["formula_bytes"]
        assert cell["factor_bytes"] > ours["factor_bytes"]
    total = saved["extrapolation"]["gpu_bytes"]
    assert total["ours factors"] == 4 * factor_floats(64, 128, 4, 8, 32, 100)["total"]
    assert total["dense factors"] == 4 * factor_floats(64, 128, 4, 0, 32, None)["total"]
    assert "## Extrapolated to 32 layers" in md and "equal." in md


def test_not_run_is_reported_with_the_estimate(tmp_path):
    result = main(
        [
            "--hidden", "64",
            "--intermediate", "128",
            "--vocab", "256",
            "--tokens", "8",
            "--sequences", "4",
            "--lora-r", "4",
            "--no-breakdown",
            "--dense-max-gib", "0.000001",
            "--eigh-probe", "32",
            "--output", str(tmp_path),
        ]
    )  # fmt: skip
    for cell in result["dense"].values():
        assert cell["not_run"].startswith("not run: needs ")
        assert "eigh up to 128^2" in cell["not_run"]
    # the library default threshold (512) keeps every factor of this shape dense
    assert result["formula_check"]["equal_with_kept_ranks"]
    assert result["ours"]["kept_ranks"] == []
