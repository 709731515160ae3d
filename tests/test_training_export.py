"""training.export / predict / checkpoint: real exports of both cells through the parity gate, and broken ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from app.manifest import MODEL_FILE, PAD_TOKEN, UNK_TOKEN
from training.checkpoint import load_checkpoint, save_checkpoint
from training.config import Cell, ModelConfig
from training.errors import ArtifactError, ParityError
from training.export import check_parity, export_model, model_version
from training.model import NextActionModel
from training.predict import encode_sequences, predict, torch_probabilities
from training.runtime import open_session, run
from training.vocab import Vocabulary

VOCAB = Vocabulary([PAD_TOKEN, UNK_TOKEN, *[f"a{i}" for i in range(38)]])
WINDOW = 6


def _model(cell: Cell) -> NextActionModel:
    """LSTM with the residual path, GRU with tied embeddings: every branch of the graph goes through the gate."""
    torch.manual_seed(1)
    model = NextActionModel(
        ModelConfig(
            vocab_size=len(VOCAB),
            cell=cell,
            embedding_dim=8,
            hidden_dim=12,
            dropout=0.1,
            window=WINDOW,
            residual=cell == "lstm",
            history_bias=True,
            tied=cell == "gru",
        )
    )
    with torch.no_grad():  # a little away from the initialisation so that every gate matters
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module", params=["lstm", "gru"])
def exported(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[NextActionModel, Path]:
    model = _model(request.param)
    path, diff = export_model(model, tmp_path_factory.mktemp(f"export-{request.param}"))
    assert diff <= 1e-5
    return model, path


def test_export_passes_the_gate_with_dynamic_axes_and_masked_softmax(
    exported: tuple[NextActionModel, Path],
) -> None:
    model, path = exported
    graph = onnx.load(path).graph
    shapes = {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in [*graph.input, *graph.output]
    }
    assert shapes == {
        "action_ids": ["batch", "time"],
        "lengths": ["batch"],
        "probabilities": ["batch", len(VOCAB)],
    }
    assert not (path.parent / (MODEL_FILE + ".tmp")).exists()
    session = open_session(path)
    ids = np.array([[5, 6, 7, 0, 0, 0, 0, 0, 0], [2] * 9, [0] * 9], dtype=np.int64)  # time 9 > window
    lengths = np.array([3, 9, 0], dtype=np.int64)
    probs = run(session, ids, lengths)
    assert probs.dtype == np.float32 and probs.shape == (3, len(VOCAB))
    assert np.all(probs[:, :2] == 0) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    assert np.abs(probs - torch_probabilities(model, ids, lengths)).max() <= 1e-5
    # padding after a row's length changes nothing
    other_padding = ids.copy()
    other_padding[0, 3:] = 9
    assert np.abs(run(session, other_padding, lengths)[0] - probs[0]).max() <= 1e-6
    assert len(model_version(path)) == 16


def _broken_copy(path: Path, out: Path, edit: str) -> Path:
    proto = onnx.load(path)
    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    if edit == "weights":
        head = inits["head.weight"]
        noise = np.random.default_rng(0).normal(0, 1e-2, size=tuple(head.dims)).astype(np.float32)
        head.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(head) + noise, head.name))
    elif edit == "gates":  # the classic GRU/LSTM export bug: gate blocks in the wrong order
        rnn = next(n for n in graph.node if n.op_type in ("LSTM", "GRU"))
        w = inits[rnn.input[1]]
        arr = numpy_helper.to_array(w).copy()  # (1, gates * H, E)
        h = arr.shape[1] // (4 if rnn.op_type == "LSTM" else 3)
        arr[:, : 2 * h] = np.concatenate([arr[:, h : 2 * h], arr[:, :h]], axis=1)
        w.CopyFrom(numpy_helper.from_array(arr, w.name))
    else:  # a time axis frozen to the window, as the exporter does when its RNN decomposition specialises
        dim = graph.input[0].type.tensor_type.shape.dim[1]
        dim.Clear()
        dim.dim_value = WINDOW
    target = out / f"{edit}.onnx"
    onnx.save(proto, target)
    return target


@pytest.mark.parametrize("edit", ["weights", "gates"])
def test_gate_rejects_a_wrong_graph_with_the_measured_difference(
    exported: tuple[NextActionModel, Path], tmp_path: Path, edit: str
) -> None:
    model, path = exported
    with pytest.raises(ParityError, match=r"disagree: max \|difference\| [0-9.e-]+ > 1e-05 at batch=1") as e:
        check_parity(model, _broken_copy(path, tmp_path, edit))
    diff = float(str(e.value).split("max |difference| ")[1].split(" ")[0])
    assert diff > 1e-5


def test_gate_rejects_a_frozen_time_axis(exported: tuple[NextActionModel, Path], tmp_path: Path) -> None:
    model, path = exported
    with pytest.raises(ParityError, match=r"cannot run the graph at batch=1, time=1"):
        check_parity(model, _broken_copy(path, tmp_path, "frozen"))


def test_failed_gate_writes_no_model(tmp_path: Path) -> None:
    with pytest.raises(ParityError, match="> -1"):
        export_model(_model("lstm"), tmp_path, tolerance=-1.0)  # nothing can pass: the export is aborted
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_round_trip_and_predict_api(tmp_path: Path) -> None:
    model = _model("gru")
    path = save_checkpoint(tmp_path / "checkpoint.pt", model, VOCAB)
    loaded, vocab = load_checkpoint(tmp_path)
    assert vocab.tokens == VOCAB.tokens and loaded.config == model.config and not loaded.training
    sequences = [["a1", "a2", "a3"], [], ["never-seen", "a4"], [f"a{i}" for i in range(20)]]
    probs = predict(path, sequences)
    ids, lengths = encode_sequences(VOCAB, sequences, WINDOW)
    assert lengths.tolist() == [3, 0, 2, WINDOW]  # cut to the window, like the service
    assert ids[3].tolist() == VOCAB.encode([f"a{i}" for i in range(14, 20)]).tolist()
    assert np.array_equal(probs, torch_probabilities(model, ids, lengths))
    assert np.array_equal(probs, predict((model, VOCAB), sequences))
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ArtifactError, match="bad.pt: not a readable checkpoint"):
        load_checkpoint(tmp_path / "bad.pt")
