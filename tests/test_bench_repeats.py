"""bench/repeats.py and bench/recent_blend.py on the example data and a real trained artifact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.manifest import read_manifest
from bench import recent_blend, repeats
from tests.conftest import EXAMPLES


def test_repeats_accounts_for_every_case(tmp_path: Path) -> None:
    out = tmp_path / "repeats"
    assert repeats.main(["--data", str(EXAMPLES / "taobao_sample.csv"), "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    for part in ("validation", "test"):
        figures = result[part]
        assert figures["unknown_targets"] + figures["known_targets"] == figures["cases"] == 40
        assert sum(figures["latest_age"].values()) == figures["known_in_window"] <= figures["known_targets"]
        hits = figures["item_knn_hits_at_10"]
        assert hits["in_window"] + hits["not_in_window"] == round(
            figures["metrics"]["full"]["item-knn"]["hr@10"] * figures["cases"]
        )
        assert len(figures["metrics"]["sampled"]) == 1 + len(repeats.RECENT)
    assert "| known targets in the window |" in out.with_suffix(".md").read_text()


def test_recent_blend_reproduces_the_reports_figures_at_its_corners(
    item_artifact: Path, tmp_path: Path
) -> None:
    # one artifact as both the selected and the refitted model: the corners of the grid must be the report's
    # model (both protocols) and item-kNN (fitted on every event before the test targets; full ranking only:
    # the graph's table keeps 100 neighbours per action, which moves a few sampled negatives)
    out = tmp_path / "recent"
    data = EXAMPLES / "beauty_sample.csv"
    args = ["--selected", str(item_artifact), "--refit", str(item_artifact), "--data", str(data)]
    assert recent_blend.main([*args, "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    metrics = read_manifest(item_artifact).metrics
    for corner, scorer, protocols in (
        ("model_alone", "model", ("full", "sampled")),
        ("item_knn", "item-knn", ("full",)),
    ):
        for protocol in protocols:
            for name in ("hr@10", "ndcg@10"):
                got, want = result[corner][protocol][name], metrics[protocol][scorer][name]
                assert got == pytest.approx(want, abs=1e-6), (corner, protocol, name)
    chosen = result["chosen"]
    assert chosen["validation"]["ndcg@10"] >= result["today"]["validation"]["ndcg@10"]  # b = 0 is in the grid
    assert len(result["validation"]) == len(recent_blend.GRID) == 66
    # the sampled protocol's ceiling: consistent counts, item-kNN's hits those of its corner, no grid unasked
    ceiling = result["sampled_ceiling"]
    assert ceiling["item_knn_hits_at_rank_1"] <= ceiling["item_knn_hits"] <= ceiling["known_targets"]
    assert ceiling["known_targets"] <= ceiling["cases"] == result["test_cases"]
    assert ceiling["item_knn_hits"] / ceiling["cases"] == pytest.approx(
        result["item_knn"]["sampled"]["hr@10"]
    )
    assert len(ceiling["item_knn_misses"]) == ceiling["known_targets"] - ceiling["item_knn_hits"]
    assert "grid_mixtures" not in ceiling
