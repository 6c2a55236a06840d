"""`benchmarks/bench_generation.py --tiny` and `bench_generation_cost.py --tiny`:
the whole pipelines in seconds, and the peak-memory measurement."""

from __future__ import annotations

import json

import torch

from benchmarks.bench_generation import METHODS, main
from benchmarks.bench_generation_cost import cpu_peak_bytes
from benchmarks.bench_generation_cost import main as cost_main
from benchmarks.profile_linearised import main as profile_main


def test_tiny_run_writes_json_of_the_agreed_shape(tmp_path):
    main(["--tiny", "--threads", "1", "--output", str(tmp_path)])
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
    table = (tmp_path / "generation.md").read_text()
    assert "LA-linearised" in table and "MI shifted" in table
    assert (tmp_path / "generation.png").stat().st_size > 10_000


def test_cost_run_writes_the_cost_table(tmp_path):
    cost_main(["--tiny", "--repeats", "1", "--threads", "1", "--output", str(tmp_path)])
    result = json.loads((tmp_path / "cost.json").read_text())
    assert [r["tokens"] for r in result["cost"]] == result["config"]["cost_lengths"]
    vocab = set()
    for row in result["cost"]:
        assert row["K"] == result["config"]["n_samples"]
        for key in ("sampling", "linearised", "linearised_one_per_jvp"):
            assert row[f"{key}_forward_passes"] > 0 and row[f"{key}_s"] > 0
        vocab.add(row["logits_mib"] * 2**20 / (row["tokens"] * 4))
        # every method holds at least the average of the softmaxes
        for key in ("sampling", "linearised"):
            assert row[f"{key}_peak_mib"] >= row["logits_mib"]
    assert len(vocab) == 1 and vocab.pop() > 64  # one logits tensor per row
    table = (tmp_path / "cost.md").read_text()
    assert table.count("\n| ") == len(result["cost"]) + 1  # header + one row each
    assert not (tmp_path / "generation.json").exists()


def test_cpu_peak_counts_live_tensor_bytes():
    keep = torch.ones(1000)  # older than the call: its free counts against it

    def work():
        a = torch.empty(250_000)  # 1 MB
        b = torch.empty(500_000)  # 2 MB: 3 MB live
        del a
        c = torch.empty(125_000)  # 0.5 MB: 2.5 MB live
        return b, c

    assert cpu_peak_bytes(work) == 3_000_000
    assert cpu_peak_bytes(lambda: torch.empty(10)) == 40
    del keep


def test_auto_prior_run_tunes_on_held_out_articles(tmp_path):
    main(["--tiny", "--prior", "auto", "--threads", "1", "--output", str(tmp_path)])
    result = json.loads((tmp_path / "generation_auto.json").read_text())
    choice = result["config"]["prior_choice"]
    assert choice["method"] in ("marglik", "gridsearch", "map")
    assert choice["val_loss"] <= choice["val_loss_map"]
    assert result["config"]["prior_precision"] == choice["prior_precision"]
    assert (
        "auto on 4 held-out articles" in (tmp_path / "generation_auto.md").read_text()
    )
    assert not (tmp_path / "generation.json").exists()


def test_linearised_profile_reports_times_and_operator_shares(tmp_path):
    argv = ["--tiny", "--tokens", "16", "--chunks", "4", "2", "--repeats", "1"]
    profile_main([*argv, "--output", str(tmp_path)])
    result = json.loads((tmp_path / "profile_linearised.json").read_text())
    assert set(result["jvp_s"]) == {"4", "2"} and result["decoder_s"] > 0
    for key in ("jvp_ops", "decoder_ops"):
        shares = [o["share"] for o in result[key]]
        assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-9
    assert "decoder passes" in (tmp_path / "profile_linearised.md").read_text()
