"""`laplace-lora bench --matrix`: the grid, the headline and the tables."""

from __future__ import annotations

import json

import pytest

from benchmarks.suite.matrix import (
    COMPARISONS,
    MATRIX_CONTENDERS,
    cells,
    headline,
    merge,
    to_markdown,
)


def test_grid_is_every_placement_length_and_class_count():
    grid = cells(["q,v", "k,o", "all-linear"], [48, 128, 512], [3, 5])
    assert len(grid) == 18
    assert {(c["tokens"], c["n"]) for c in grid} == {(48, 8), (128, 2), (512, 2)}
    # every laplace-torch backend of a comparison is run, and ours
    for ours, theirs in COMPARISONS.values():
        assert ours in MATRIX_CONTENDERS and set(theirs) <= set(MATRIX_CONTENDERS)


def _row(cell, fits):
    return {
        "cell": cell,
        "cells": [{"contender": n, "fit_s": s} for n, s in fits.items()],
    }


def test_headline_counts_cells_where_ours_is_fastest_and_the_worst_ratio():
    a, b, c = cells(["q,v"], [48, 128, 512], [3])
    rows = [
        _row(
            a,
            {
                "ours kron default": 1.0,
                "laplace-torch kron CurvlinopsGGN": 2.0,
                "laplace-torch kron AsdlGGN": 3.0,
                "ours kron EF": 1.0,
                "laplace-torch kron AsdlEF": 0.5,  # faster than ours: 2x
            },
        ),
        _row(
            b,
            {
                "ours kron default": 3.0,
                "laplace-torch kron AsdlGGN": 2.0,  # the other one failed
                "ours kron EF": 1.0,
                "laplace-torch kron CurvlinopsEF": 4.0,
            },
        ),
        _row(c, {"ours kron default": 1.0}),  # nothing to compare with
    ]
    h = headline(rows)
    assert h["GGN"]["compared"] == 2 and h["GGN"]["fastest"] == 1
    assert h["GGN"]["worst"] == pytest.approx(1.5)
    assert h["GGN"]["worst_cell"] == b
    assert h["EF"]["compared"] == 2 and h["EF"]["fastest"] == 1
    assert h["EF"]["worst"] == pytest.approx(2.0) and h["EF"]["worst_cell"] == a
    result = {
        "meta": {"command": "x"},
        "rows": rows,
        "headline": {"fit_s": h, "predict_s": headline(rows, "predict_s")},
    }
    md = to_markdown(result)
    assert "| fit (s), GGN | 1 / 2 | 1.5 | q,v, 128 tok, C=3 |" in md
    assert "| GLM predictive (s), GGN | 0 / 0 |" in md


def test_headline_on_ratios_to_each_process_own_forward_backward():
    """Ours took longer in seconds, but its process's forward+backward too
    (a slower moment of the machine): by ratio ours is faster."""
    (a,) = cells(["q,v"], [48], [3])
    row = {
        "cell": a,
        "cells": [
            {"contender": "ours kron default", "fit_s": 6.0, "fit_x": 3.0},
            {
                "contender": "laplace-torch kron CurvlinopsGGN",
                "fit_s": 5.0,
                "fit_x": 5.0,
            },
        ],
    }
    assert headline([row], "fit_s")["GGN"]["fastest"] == 0
    by_ratio = headline([row], "fit_x")["GGN"]
    assert by_ratio["fastest"] == 1 and by_ratio["worst"] == pytest.approx(0.6)


def test_parts_of_the_grid_merge_in_grid_order(tmp_path):
    rows = [
        _row(c, {"ours kron default": 1.0, "laplace-torch kron AsdlGGN": 2.0})
        for c in cells(["q,v"], [48, 128, 512], [3])
    ]
    meta = {
        "machine": "m",
        "torch": "t",
        "device": "cpu",
        "threads": 1,
        "repeats": 1,
        "command": "a",
        "seconds": 1.0,
    }
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"meta": meta, "rows": rows[2:]}))
    b.write_text(json.dumps({"meta": {**meta, "command": "b"}, "rows": rows[:2]}))
    out = merge([str(a), str(b)], str(tmp_path / "out"))
    assert [r["cell"]["tokens"] for r in out["rows"]] == [48, 128, 512]
    assert out["headline"]["fit_s"]["GGN"]["fastest"] == 3
    assert (tmp_path / "out" / "bench_matrix.md").exists()
    # a merged result is a part too; a cell run again replaces the first run
    again = _row(
        rows[0]["cell"], {"ours kron default": 9.0, "laplace-torch kron AsdlGGN": 2.0}
    )
    c = tmp_path / "c.json"
    c.write_text(json.dumps({"meta": {**meta, "command": "c"}, "rows": [again]}))
    out2 = merge(
        [str(tmp_path / "out" / "bench_matrix.json"), str(c)], str(tmp_path / "o2")
    )
    assert [r["cell"]["tokens"] for r in out2["rows"]] == [48, 128, 512]
    assert out2["rows"][0] == again and out2["meta"]["replaced"] == "q,v, 48 tok, C=3"
    assert out2["meta"]["seconds"] == [1.0, 1.0, 1.0]
    assert out2["headline"]["fit_s"]["GGN"]["fastest"] == 2
    b.write_text(json.dumps({"meta": {**meta, "threads": 2}, "rows": rows[:2]}))
    with pytest.raises(ValueError, match="threads"):
        merge([str(a), str(b)], str(tmp_path / "out"))
