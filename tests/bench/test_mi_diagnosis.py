"""`benchmarks/diagnose_generation_mi.py --tiny`: the diagnosis in seconds."""

from __future__ import annotations

import json

from benchmarks.diagnose_generation_mi import main


def test_tiny_diagnosis_measures_both_sides(tmp_path):
    main(["--tiny", "--n-diag", "4", "--threads", "1", "--output", str(tmp_path)])
    result = json.loads((tmp_path / "mi_diagnosis.json").read_text())
    for side in ("in_domain", "shifted"):
        row = result[side]
        assert row["tokens"] > 0 and sum(row["tokens_by_entropy_bin"]) == row["tokens"]
        assert row["mi_prior"] > 0 and row["mi_posterior"] > 0
        assert row["dh2_prior"] > 0 and row["dh2_posterior"] > 0
        assert row["dh2_ratio"] == row["dh2_posterior"] / row["dh2_prior"]
    # a PSD curvature can only shrink the variance below the prior's
    for kind, ratio in result["variance_ratio"].items():
        assert kind in ("lora_A", "lora_B") and 0 < ratio <= 1 + 1e-9
    assert len(result["entropy_bin_edges"]) == 2
    assert "MI prior only" in (tmp_path / "mi_diagnosis.md").read_text()
