"""`laplace-lora bench --quick` end to end: every section, files, agreement."""

from __future__ import annotations

import json

from laplace_lora_backend.cli import main


def test_quick_bench_writes_tables_and_agrees_with_laplace_torch(tmp_path):
    main(["bench", "--quick", "--output", str(tmp_path)])
    result = json.loads((tmp_path / "bench_quick.json").read_text())
    table = (tmp_path / "bench_quick.md").read_text()
    assert (tmp_path / "bench_quick_widths.png").stat().st_size > 10_000
    assert len(result["models"]) == 2  # tiny Llama and GPT-2
    for wl in result["models"]:
        cells = {c["contender"]: c for c in wl["cells"]}
        ours = cells["ours kron dense"]
        for key in (
            "fit_s",
            "fit_x",
            "fwd_bwd_s",
            "factor_mib",
            "marglik_s",
            "marglik_x",
            "predict_s",
            "predict_x",
        ):
            assert ours[key] > 0, key
        assert ours["runs"] == 2  # tiny cells fit the time budget
        assert cells["ours kron MC"]["fit_x"] > 0
        # same K-FAC (exact GGN, expand) as laplace-torch + Curvlinops
        ref = cells["laplace-torch kron CurvlinopsGGN"]
        assert ref["agree_with"] == "ours kron dense"
        assert ref["lml_rel_diff"] < 1e-5 and ref["probs_max_diff"] < 1e-5
        ef = cells["laplace-torch kron CurvlinopsEF"]
        assert ef["lml_rel_diff"] < 1e-5 and ef["probs_max_diff"] < 1e-5
        # BackPACK is refused on frozen weights: reported with the reason
        assert "not supported" in cells["laplace-torch kron BackPackGGN"]["error"]
        assert f"## {wl['workload']}" in table
    widths = {(r["width"], r["contender"]): r for r in result["widths"]}
    assert (
        widths[(1024, "ours kron low-rank")]["factor_mib"]
        < (widths[(1024, "ours kron dense")]["factor_mib"])
    )
    for row in result["outputs"]:
        assert row["probs_max_diff"] < 1e-5, row
    assert result["targets"] == []  # quick sizes have no target cells
    assert result["meta"]["seconds"] < 300
