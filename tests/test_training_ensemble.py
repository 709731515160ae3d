"""`--ensemble K`: K seeds averaged in one exported graph; both parity gates; the service loads and steps it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from app.manifest import MODEL_FILE, STEP_FILE, read_manifest
from app.model import load_model
from tests.conftest import EXAMPLES, ROOT
from training.checkpoint import load_checkpoint
from training.config import ModelConfig
from training.ensemble import EnsembleModel
from training.export import parity_cases
from training.model import NextActionModel
from training.predict import torch_probabilities
from training.runtime import open_session, run

HIDDEN = 8


@pytest.fixture(scope="module")
def ensemble_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """Two tiny LSTMs on the Taobao sample's categories (578 ids), trained and exported as one artifact."""
    out = tmp_path_factory.mktemp("ensemble")
    cmd = [
        sys.executable, "-m", "training", "train", "--data", str(EXAMPLES / "taobao_sample.csv"),
        "--action-col", "category_id", "--out", str(out), "--quiet", "--seed", "7", "--threads", "1",
        "--window", "10", "--epochs", "2", "--embedding-dim", "8", "--hidden-dim", str(HIDDEN),
        "--ensemble", "2",
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    return out, json.loads(done.stdout)


def test_ensemble_scores_are_the_mean_of_the_members(ensemble_run: tuple[Path, dict[str, Any]]) -> None:
    out, _ = ensemble_run
    model, _ = load_checkpoint(out)
    assert isinstance(model, EnsembleModel) and len(model) == 2
    session = open_session(out / MODEL_FILE)
    for case in parity_cases(model.config.vocab_size, model.config.window)[:4]:
        members = [torch_probabilities(m, case.action_ids, case.lengths) for m in model.members]  # type: ignore[arg-type]
        assert not np.allclose(members[0], members[1], atol=1e-4)  # two seeds: two different models
        mean = np.mean(members, axis=0)  # (B, V)
        served = run(session, case.action_ids, case.lengths)  # ONNX Runtime, the graph the service runs
        assert np.abs(served - mean).max() <= 1e-5
        assert np.allclose(served.sum(axis=1), 1.0, atol=1e-4) and not served[:, :2].any()


def test_ensemble_passes_both_gates_and_reports_every_member(
    ensemble_run: tuple[Path, dict[str, Any]],
) -> None:
    out, result = ensemble_run
    manifest = read_manifest(out)
    assert result["parity_max_abs_diff"] <= 1e-5  # model.onnx's gate (torch vs ONNX Runtime)
    assert manifest.step is not None and (out / STEP_FILE).is_file()  # step.onnx's gate (vs model.onnx)
    assert manifest.step.state_shape == (1, 2 * HIDDEN)  # the two members' states side by side
    assert manifest.step.parity_max_abs_diff <= 1e-5
    assert manifest.hidden_dim == HIDDEN and manifest.training.seed == 7
    members = result["ensemble"]["members"]
    assert [m["seed"] for m in members] == [7, 8]
    assert all(m["best_epoch"] >= 1 and 0 <= m["val_ndcg10"] <= m["val_hr10"] <= 1 for m in members)
    assert set(result["ensemble"]["validation"]) == {"hr@10", "ndcg@10"}
    report = (out / "report.md").read_text()
    assert "## Ensemble" in report and "| 2 | 8 |" in report and "| ensemble |" in report


def test_the_service_steps_an_ensemble_state(ensemble_run: tuple[Path, dict[str, Any]]) -> None:
    out, _ = ensemble_run
    model = load_model(out, incremental=True)  # loading runs the service's own step check
    ids = np.array([5, 9, 14, 3, 22], dtype=np.int64)
    _, states = model.step_state([ids[:3]], [None])  # (1, 2, L, 2H): h and c of both members
    assert states.shape == (1, 2, 1, 2 * HIDDEN)
    stepped, _ = model.step_state([ids[3:]], [states[0]], [ids])
    assert np.abs(stepped - model.probabilities([ids])).max() <= 1e-5


def test_ensemble_members_must_share_a_configuration() -> None:
    a = NextActionModel(ModelConfig(vocab_size=9, embedding_dim=4, hidden_dim=4))
    b = NextActionModel(ModelConfig(vocab_size=9, embedding_dim=4, hidden_dim=6))
    with pytest.raises(ValueError, match="one configuration"):
        EnsembleModel([a, b])
    ensemble = EnsembleModel([a, a]).eval()
    ids, lengths = torch.tensor([[2, 3, 0]]), torch.tensor([2])
    assert torch.allclose(ensemble(ids, lengths), a.eval()(ids, lengths))  # one model twice: itself
