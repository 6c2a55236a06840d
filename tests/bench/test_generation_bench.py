"""`benchmarks/bench_generation.py --tiny --cost`: the whole pipeline in seconds."""

from __future__ import annotations

import json

from benchmarks.bench_generation import METHODS, main


def test_tiny_run_writes_json_of_the_agreed_shape(tmp_path):
    main(["--tiny", "--cost", "--threads", "1", "--output", str(tmp_path)])
    result = json.loads((tmp_path / "generation.json").read_text())
    for side in ("in_domain", "shifted"):
        assert set(result[side]) == set(METHODS)
        for method in METHODS:
            cell = result[side][method]
            assert cell["nll"] > 0 and 0 <= cell["ece"] <= 1
            assert cell["tokens"] > 0
        assert result[side]["MAP"]["mutual_information"] == 0
        assert result[side]["LA-sampling"]["mutual_information"] > 0
        assert isinstance(result["mutual_information"][side], float)
    assert result["config"]["model"] == "tiny"
    for side in ("in_domain", "shifted"):
        assert result["generation"][side]["mutual_information"] > 0
    assert [r["tokens"] for r in result["cost"]] == result["config"]["cost_lengths"]
    for row in result["cost"]:
        for key in ("sampling", "linearised", "linearised_chunked"):
            assert row[f"{key}_forward_passes"] > 0
    table = (tmp_path / "generation.md").read_text()
    assert "LA-linearised" in table and "fwd passes" in table
    assert (tmp_path / "generation.png").stat().st_size > 10_000
