"""Int8 output layer (training/quantize.py): the gated export, the service serving it, and its errors.

Real artifacts trained by the training package, real ONNX Runtime, the real Redis; the float32 reference is the
artifact the int8 copy came from, or the PyTorch checkpoint itself.
"""

from __future__ import annotations

import csv
import hashlib
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from app.manifest import MANIFEST_FILE, MODEL_FILE, STEP_FILE, read_manifest
from app.model import load_model
from tests.app_client import running_app
from tests.conftest import EXAMPLES
from tests.training_cli import cli, cli_error
from training.__main__ import main
from training.errors import ParityError
from training.predict import predict
from training.quantize import (
    PROB_TOLERANCE,
    TOP10_MIN,
    QuantizeError,
    agreement,
    check_quantized,
    quantize_artifact,
    quantize_graph,
)

T0 = 1_700_000_000.0


def _sha16(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _histories(window: int, users: int = 120) -> list[list[str]]:
    """The last `window` items of the first users of the Beauty sample: real histories, not random ids."""
    by_user: dict[str, list[str]] = {}
    with (EXAMPLES / "beauty_sample.csv").open() as f:
        for row in csv.DictReader(f):
            by_user.setdefault(row["user_id"], []).append(row["item_id"])
    return [h[-window:] for h in list(by_user.values())[:users]]


@pytest.fixture(scope="module")
def int8_item(item_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`python -m training quantize` of the session's Beauty-sample model (with step.onnx and history bias)."""
    out = tmp_path_factory.mktemp("int8-item") / "artifact"
    assert main(["quantize", "--artifact", str(item_artifact), "--out", str(out), "--quiet"]) == 0
    return out


def test_quantize_writes_a_gated_int8_artifact(item_artifact: Path, int8_item: Path) -> None:
    float_m, m = read_manifest(item_artifact), read_manifest(int8_item)
    q = m.quantization
    assert q is not None and q.scheme == "int8" and q.layers == 1
    assert q.max_abs_diff <= PROB_TOLERANCE and q.top10_overlap >= TOP10_MIN
    assert q.float_model_version == float_m.model_version != m.model_version
    assert m.model_version == _sha16(int8_item / MODEL_FILE)
    assert m.step is not None and m.step.sha256 == _sha16(int8_item / m.step.file)
    assert m.vocabulary == float_m.vocabulary and float_m.quantization is None
    for name in (MODEL_FILE, m.step.file):
        graph = onnx.load(str(int8_item / name)).graph
        ops = {n.op_type for n in graph.node}
        assert "MatMulIntegerToFloat" in ops and "Gemm" not in ops, name
        heads = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
        assert len(heads) == 1 and np.abs(numpy_helper.to_array(heads[0])).max() <= 63  # 7-bit weights
    assert (int8_item / "checkpoint.pt").is_file() and (int8_item / "report.md").is_file()
    assert not [p.name for p in int8_item.iterdir() if p.name.startswith(".quantize")]


def test_service_scores_int8_close_to_float(item_artifact: Path, int8_item: Path) -> None:
    """Loaded as the service loads it (the step graph checked against model.onnx at load), on real histories."""
    served = load_model(int8_item, device="cpu", incremental=True)
    reference = load_model(item_artifact, device="cpu")
    rows = [served.encode(h)[0] for h in _histories(served.manifest.window)]
    got, want = served.probabilities(rows), reference.probabilities(rows)  # (B, V)
    measured = agreement(want, got)
    assert measured.max_abs_diff <= PROB_TOLERANCE
    assert measured.top10_overlap >= TOP10_MIN
    assert np.allclose(got.sum(axis=1), 1.0, atol=1e-5) and np.all(got[:, :2] == 0)


def test_a_rows_int8_probabilities_do_not_depend_on_its_batch(int8_item: Path) -> None:
    """Each row is quantized on its own scale: alone or among others, the same probabilities."""
    served = load_model(int8_item, device="cpu")
    rows = [served.encode(h)[0] for h in _histories(served.manifest.window, users=24)]
    together = served.probabilities(rows)  # (B, V)
    for i in (0, 7, 23):
        alone = served.probabilities([rows[i]])[0]
        assert float(np.abs(alone - together[i]).max()) <= 1e-6


@pytest.mark.anyio
async def test_http_predictions_come_from_the_int8_model(int8_item: Path, redis_url: str) -> None:
    m = read_manifest(int8_item)
    history = _histories(m.window, users=1)[0]
    events = [{"action": a, "timestamp": T0 + i} for i, a in enumerate(history)]
    served = load_model(int8_item, device="cpu")
    (want,) = served.predict([(history, 5)])
    async with running_app(int8_item, redis_url, incremental_state=True) as (_, client):
        r = await client.post("/v1/users/u1/events", params={"k": 5}, json={"events": events})
        assert r.status_code == 200, r.text
        body = r.json()
        more = {"action": history[0], "timestamp": T0 + 100}  # one more event: stepped from the stored state
        r2 = await client.post("/v1/users/u1/events", params={"k": 5}, json={"events": [more]})
        assert r2.status_code == 200, r2.text
    assert body["model_version"] == m.model_version
    assert [p["action"] for p in body["predictions"]] == want.actions
    got = [p["probability"] for p in body["predictions"]]
    assert np.allclose(got, want.probabilities, atol=1e-6)
    (after,) = served.predict([([*history, history[0]], 5)])
    assert [p["action"] for p in r2.json()["predictions"]] == after.actions


def test_gate_refuses_an_int8_graph_far_from_float(item_artifact: Path, tmp_path: Path) -> None:
    vocab = read_manifest(item_artifact).vocab_size
    path = tmp_path / MODEL_FILE
    assert quantize_graph(item_artifact / MODEL_FILE, path, vocab) == 1
    model = onnx.load(str(path))
    for t in model.graph.initializer:
        if t.name.endswith("_w_scale"):  # every action's weights three times too large
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 3, t.name))
    onnx.save(model, str(path))
    with pytest.raises(ParityError, match="disagree|top 10"):
        check_quantized(item_artifact / MODEL_FILE, path, vocab, read_manifest(item_artifact).window)


def test_a_failed_gate_writes_nothing(item_artifact: Path, tmp_path: Path) -> None:
    """A step graph that no longer matches model.onnx: the int8 step gate refuses, and --out is not left."""
    broken = tmp_path / "broken"
    shutil.copytree(item_artifact, broken)
    step = onnx.load(str(broken / STEP_FILE))
    for t in step.graph.initializer:
        if list(t.dims) == [read_manifest(broken).vocab_size]:  # the output layer's bias: one per action
            bias = numpy_helper.to_array(t).copy()
            bias[2::2] += 1.0  # every other action: not a uniform shift, which softmax would cancel
            t.CopyFrom(numpy_helper.from_array(bias, t.name))
    onnx.save(step, str(broken / STEP_FILE))
    out = tmp_path / "int8"
    with pytest.raises(ParityError, match="step graph and model.onnx disagree"):
        quantize_artifact(broken, out)
    assert not out.exists()


def test_quantize_errors_name_what_is_wrong(
    capsys: pytest.CaptureFixture[str], item_artifact: Path, int8_item: Path, tmp_path: Path
) -> None:
    err = cli_error(capsys, "quantize", "--artifact", str(int8_item), "--out", str(tmp_path / "again"))
    assert "already quantized" in err and MANIFEST_FILE in err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep")
    err = cli_error(capsys, "quantize", "--artifact", str(item_artifact), "--out", str(busy))
    assert "--out" in err and "not an empty directory" in err
    err = cli_error(capsys, "quantize", "--artifact", str(tmp_path / "missing"), "--out", str(tmp_path / "o"))
    assert "manifest file not found" in err
    err = cli_error(capsys, "train", "--data", "x.csv", "--out", str(tmp_path / "t"), "--quantize", "fp4")
    assert "--quantize" in err and "invalid choice" in err and "int8" in err
    err = cli_error(capsys, "quantize", "--artifact", str(item_artifact), "--out", "o", "--scheme", "int4")
    assert "--scheme" in err and "invalid choice" in err
    with pytest.raises(QuantizeError, match="no output layer"):
        quantize_graph(int8_item / MODEL_FILE, tmp_path / "twice.onnx", read_manifest(int8_item).vocab_size)


def test_train_quantize_int8_exports_behind_the_gate(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "trained"
    result = cli(
        capsys,
        "train",
        "--data",
        str(EXAMPLES / "beauty_sample.csv"),
        "--out",
        str(out),
        "--action-col",
        "item_id",
        "--window",
        "10",
        "--epochs",
        "1",
        "--embedding-dim",
        "8",
        "--hidden-dim",
        "16",
        "--no-refit",
        "--seed",
        "7",
        "--quiet",
        "--quantize",
        "int8",
    )
    m = read_manifest(out)
    assert result["model_version"] == m.model_version == _sha16(out / MODEL_FILE)
    assert m.quantization is not None and result["quantization"] == m.quantization.model_dump()
    assert m.step is not None and result["step"]["sha256"] == m.step.sha256 == _sha16(out / m.step.file)
    served = load_model(out, device="cpu", incremental=True)
    histories = _histories(m.window)
    float_probs = predict(out, histories)  # PyTorch, from checkpoint.pt's float32 weights: (B, V)
    measured = agreement(float_probs, served.probabilities([served.encode(h)[0] for h in histories]))
    assert measured.max_abs_diff <= PROB_TOLERANCE and measured.top10_overlap >= TOP10_MIN
