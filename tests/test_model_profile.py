"""bench/model_bench.py --profile (bench/model_profile.py) on a real trained model with its step graph."""

from __future__ import annotations

import json
from pathlib import Path

from app.model import load_model
from bench import model_bench, model_profile


def test_profile_takes_the_incremental_call_apart(behavior_artifact: Path, tmp_path: Path) -> None:
    out = tmp_path / "profile"
    args = ["--artifact-dir", str(behavior_artifact), "--profile", "--batch-sizes", "1,3", "--calls", "3"]
    assert model_bench.main([*args, "--gap-ms", "1", "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert [(r["batch"], r["cache"]) for r in result["rows"]] == [
        (1, "warm"),
        (1, "cold"),
        (3, "warm"),
        (3, "cold"),
    ]
    for row in result["rows"]:
        stages = row["stages_ms"]
        assert stages["run"] > 0 and stages["encode"] > 0 and stages["decode"] > 0
        assert stages["run"] < stages["advance"]
        assert "LSTM" in row["ops_us"] and row["model_run_us"] > 0
        assert ("handoff" in row) == (row["batch"] == 1)
    assert "## advance() per stage" in out.with_suffix(".md").read_text()


def test_the_clock_leaves_the_model_as_it_found_it(behavior_artifact: Path) -> None:
    model = load_model(behavior_artifact, device="cpu", incremental=True)
    session = model.step
    requests = model_profile._requests(model, model_profile._histories(model, 2, seed=0))
    before = model.advance(requests)
    model_profile.stages(model, requests, calls=2, gap_s=0.0)
    assert model.step is session and "encode" not in vars(model) and "_decode" not in vars(model)
    assert [p.actions for p, _ in model.advance(requests)] == [p.actions for p, _ in before]
