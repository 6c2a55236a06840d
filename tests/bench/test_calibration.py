"""`laplace-lora calibrate` on the tiny model: files, schema, acceptance checks."""

from __future__ import annotations

import json

import pytest

from benchmarks.calibration import (
    ABLATIONS,
    CASES,
    METHODS,
    BatteryConfig,
    Case,
    acceptance,
    aggregate,
    run_battery,
)


def test_tiny_battery_writes_runs_and_summary(tmp_path):
    cfg = BatteryConfig(
        model="tiny", seeds=[0, 1], n_val=16, n_test=24, epochs=2, output=str(tmp_path)
    )
    cases = [Case("drugreview", ("q_proj", "v_proj", "lm_head"), 24)]
    run_battery(cfg, cases, log=lambda *a: None)
    summary = aggregate(cfg, cases)
    (record,) = summary["cases"]
    assert record["case"] == "drugreview-qvhead-24"
    assert [r["seed"] for r in record["seeds"]] == [0, 1]
    for m in METHODS + ABLATIONS:
        for run in record["seeds"]:
            assert set(run[m]) >= {"acc", "ece", "nll", "brier"}
        mean_nll = sum(r[m]["nll"] for r in record["seeds"]) / 2
        assert record[m]["nll"] == pytest.approx(mean_nll)
    assert record["seeds"][0]["priors"]["LA-auto"]["method"] in {
        "marglik",
        "gridsearch",
        "map",
    }
    assert set(record["checks"]) == set(METHODS[2:] + ABLATIONS)
    for m in METHODS[2:] + ABLATIONS:
        assert 0 <= record[m]["flipped"] <= 1
    md = (tmp_path / "calibration.md").read_text()
    assert "| drugreview-qvhead-24 |" in md and "cases passing every check" in md
    for name in ("calibration.json", "calibration.md", "calibration.png"):
        assert (tmp_path / name).stat().st_size > 100
    assert json.loads((tmp_path / "calibration.json").read_text())["cases"]
    # resumable: existing run files are not recomputed
    run_file = tmp_path / "runs" / "drugreview-qvhead-24_s0.json"
    before = run_file.stat().st_mtime
    run_battery(cfg, cases, log=lambda *a: None)
    assert run_file.stat().st_mtime == before
    # re-evaluation from the saved artifacts reproduces every metric
    first = json.loads(run_file.read_text())
    run_battery(cfg, cases, log=lambda *a: None, reevaluate=True)
    again = json.loads(run_file.read_text())
    for m in METHODS + ABLATIONS:
        assert again[m] == pytest.approx(first[m], rel=1e-9, abs=1e-12)


def _record(la, mp, conf):
    return {"LA": la, "MAP": {**mp, "confidence": conf}}


def test_acceptance_checks():
    mp = {"acc": 0.6, "ece": 0.2, "nll": 1.0}
    good = {"acc": 0.6, "ece": 0.1, "nll": 0.9}
    assert all(acceptance(_record(good, mp, 0.8)).values())
    worse_nll = {"acc": 0.6, "ece": 0.1, "nll": 1.03}
    assert not acceptance(_record(worse_nll, mp, 0.8))["nll_le_1.02x_map"]
    lost_acc = {"acc": 0.58, "ece": 0.1, "nll": 0.9}
    assert not acceptance(_record(lost_acc, mp, 0.8))["acc_ge_map_minus_1pt"]
    # underconfident MAP: "strictly better" is not required
    same = {"acc": 0.6, "ece": 0.2, "nll": 1.0}
    checks = acceptance(_record(same, mp, 0.5))
    assert "better_nll_and_ece" not in checks and all(checks.values())
    assert not acceptance(_record(same, mp, 0.8))["better_nll_and_ece"]


def test_cases_vary_data_placement_and_size():
    assert len(CASES) >= 8
    assert len({c.dataset for c in CASES}) >= 2
    assert len({c.targets for c in CASES}) >= 4
    assert len({c.n_train for c in CASES}) >= 3
    assert len({c.name for c in CASES}) == len(CASES)


def test_readme_block_is_rendered_from_the_committed_json():
    """README's calibration block == readme_block(calibration.json)."""
    from pathlib import Path

    from benchmarks.calibration import README_BEGIN, README_END, readme_block

    root = Path(__file__).resolve().parents[2]
    summary = json.loads(
        (root / "benchmarks/results/calibration/calibration.json").read_text()
    )
    readme = (root / "README.md").read_text()
    start, end = readme.index(README_BEGIN), readme.index(README_END)
    assert readme[start : end + len(README_END)] == readme_block(summary)
