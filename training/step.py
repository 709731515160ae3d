"""step.onnx: the single-step graph for incremental state, exported from checkpoint.pt and gated against model.onnx.

    python -m training.step --artifact DIR

The graph takes the recurrent state a user's history left behind and S new events (S >= 1, the same for
every row of a call) and returns the probabilities after the last of them plus the new state, so the
service can score a new event without re-reading the whole window. It is written only if ONNX Runtime
agrees with model.onnx (the graph actually served) to TOLERANCE on every prefix of several histories, both
stepping one event at a time from the zero state and running a whole history in one call; then the
manifest gains its `step` entry (model_version is unchanged: it is model.onnx's hash).

A model with a history bias (the default) scores the window's action set too, which no recurrent state
holds: its step graph takes the window's ids as one more input, `history`, and adds the bias from them.

A history of length 0 has no step: the zero state's probabilities come from model.onnx at length 0.
`python -m training train` writes step.onnx into every artifact it makes (`--no-step` to skip).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from app.manifest import MODEL_FILE, PAD_ID, STEP_FILE, StepSpec, read_manifest, write_manifest
from training.checkpoint import load_checkpoint
from training.ensemble import AnyModel, members, state_width
from training.errors import ParityError
from training.knn_blend import BlendStep, KnnBlend
from training.model import NextActionModel
from training.runtime import open_session

TOLERANCE = 1e-5


class StepModel(nn.Module):
    """NextActionModel's weights, run from a given state over S events: (B, S), state -> (B, V), state."""

    def __init__(self, model: NextActionModel) -> None:
        super().__init__()
        self.m = model
        self.lstm = model.config.cell == "lstm"

    def forward(
        self, action_ids: torch.Tensor, h: torch.Tensor, *rest: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """rest: c (LSTM only), then history (B, T) (history-bias models only: the window's ids, 0-padded)."""
        m = self.m
        x = m.embed(action_ids)  # (B, S, E); dropout is the identity in eval mode
        if self.lstm:
            out, (h_out, c_out) = m.rnn(x, (h, rest[0]))  # (B, S, H), (L, B, H) x2
        else:
            out, h_out = m.rnn(x, h)  # (B, S, H), (L, B, H)
        last = m.head_input(out[:, -1], x[:, -1])  # (B, H): the same head input as model.onnx
        logits = m.logits(last)  # (B, V)
        if m.history_bias is not None:  # the window's action set, scored as model.onnx scores it
            logits = add_history(logits, rest[-1], m.history_bias)  # (B, V)
        probs = torch.softmax(logits, dim=-1)  # (B, V)
        return (probs, h_out, c_out) if self.lstm else (probs, h_out)


def add_history(logits: torch.Tensor, history: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """logits (B, V) + bias once on each action in history (B, T), right-padded with PAD; the same numbers as
    NextActionModel._add_history, computed on the (B, T) window rather than over (B, V).

    _add_history builds a (B, V) one-hot (zeros, scatter, multiply, add: four passes over the vocabulary, a
    quarter of the step graph at batch 64); here the window's own logits are gathered, the bias added, and
    written back (a repeated action writes the same value twice; PAD positions write PAD's logit back
    unchanged). logits + bias * 1.0 and + bias * 0.0 are exactly logits + bias and logits: parity is exact.
    """
    seen = (history != PAD_ID).to(logits.dtype)  # (B, T)
    biased = logits.gather(1, history) + bias * seen  # (B, T)
    return logits.scatter(1, history, biased)  # (B, V)


class EnsembleStepModel(nn.Module):
    """An ensemble's step: the state (L, B, K * H) is the members' states side by side; each member steps its
    slice, the probabilities are their mean (as in model.onnx) and the new states are concatenated again."""

    def __init__(self, models: list[NextActionModel]) -> None:
        super().__init__()
        self.steps = nn.ModuleList(StepModel(m) for m in models)
        self.hidden = models[0].config.hidden_dim
        self.lstm = models[0].config.cell == "lstm"

    def forward(
        self, action_ids: torch.Tensor, h: torch.Tensor, *rest: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        n_states = 2 if self.lstm else 1
        states = (h, *rest[: n_states - 1])  # (L, B, K * H) each
        extra = rest[n_states - 1 :]  # the history input, if any
        probs, outs = [], []
        for k, step in enumerate(self.steps):
            part = [s[:, :, k * self.hidden : (k + 1) * self.hidden] for s in states]  # (L, B, H) each
            p, *new = step(action_ids, *part, *extra)  # (B, V), (L, B, H) each
            probs.append(p)
            outs.append(new)
        mean = torch.stack(probs).mean(dim=0)  # (B, V)
        joined = [torch.cat([o[i] for o in outs], dim=2) for i in range(n_states)]  # (L, B, K * H) each
        return (mean, *joined)


def step_module(model: AnyModel) -> nn.Module:
    """The step graph's module: a single model's StepModel, or the ensemble's; a blend's mixes in its prior."""
    parts = members(model)
    step = StepModel(parts[0]) if len(parts) == 1 else EnsembleStepModel(parts)
    return BlendStep(step, model.prior, model.beta, model.gamma) if isinstance(model, KnnBlend) else step


def step_spec(model: AnyModel, sha256: str, parity: float) -> StepSpec:
    cfg = model.config
    lstm = cfg.cell == "lstm"
    return StepSpec(
        sha256=sha256,
        c="c" if lstm else None,
        c_out="c_out" if lstm else None,
        history="history" if cfg.history_bias else None,
        state_shape=(cfg.num_layers, state_width(model)),
        parity_max_abs_diff=parity,
    )


def export_step_onnx(model: AnyModel, path: Path) -> Path:
    """Export the step graph with dynamic batch and step axes (ONNX LSTM/GRU op); no check."""
    cfg = model.config
    step = step_module(model).eval()
    spec = step_spec(model, "0" * 16, 0.0)
    ids = torch.full((2, 3), PAD_ID + 2, dtype=torch.int64)  # (B, S) example
    h = torch.zeros(cfg.num_layers, 2, state_width(model))  # (L, B, H), K * H for an ensemble
    args: tuple[torch.Tensor, ...] = (ids, h, h.clone()) if spec.c else (ids, h)
    inputs = [spec.action_ids, spec.h] + ([spec.c] if spec.c else [])
    outputs = [spec.probabilities, spec.h_out] + ([spec.c_out] if spec.c_out else [])
    axes = {spec.action_ids: {0: "batch", 1: "steps"}, spec.probabilities: {0: "batch"}}
    axes |= {name: {1: "batch"} for name in inputs[1:] + outputs[1:]}
    if spec.history:
        args += (torch.full((2, 5), PAD_ID + 2, dtype=torch.int64),)  # (B, T) example window
        inputs.append(spec.history)
        axes[spec.history] = {0: "batch", 1: "time"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        # the TorchScript exporter maps nn.LSTM/GRU with an initial state onto one ONNX LSTM/GRU node with a
        # dynamic sequence axis: cheaper per call than the dynamo exporter's loop for a one-event step
        torch.onnx.export(
            step,
            args,
            str(path),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )
    return path


def _histories(vocab_size: int, window: int, seed: int) -> np.ndarray:
    """Seven random histories (UNK included) of window + 3 events: prefixes cover every length up to there."""
    rng = np.random.default_rng(seed)
    return rng.integers(PAD_ID + 1, vocab_size, size=(7, window + 3), dtype=np.int64)  # (B, T)


def check_step_parity(
    artifact_dir: Path,
    step_path: Path,
    tolerance: float = TOLERANCE,
    seed: int = 0,
    state_shape: tuple[int, int] | None = None,
) -> float:
    """Step graph vs model.onnx on every prefix of several histories; returns the largest |difference|.

    Checked: stepping one event at a time from the zero state (the incremental path), the whole history in
    one call from the zero state (the service's rebuild), and a state carried across calls of 3 events; for a
    history-bias model the window input is the events so far, also right-padded.
    `state_shape`: (layers, width) of the state, by default the manifest's (num_layers, hidden_dim); an
    ensemble's is wider. Raises ParityError naming the file, the prefix length and the difference.
    """
    manifest = read_manifest(artifact_dir)
    full = open_session(Path(artifact_dir) / MODEL_FILE)
    step = open_session(step_path)
    layers, hidden = state_shape or (manifest.num_layers, manifest.hidden_dim)
    lstm = manifest.cell == "lstm"
    ids = _histories(manifest.vocab_size, manifest.window, seed)  # (B, T)
    b, t = ids.shape

    history = "history" in {i.name for i in step.get_inputs()}  # a history-bias model's window input

    def run_step(chunk: np.ndarray, state: list[np.ndarray], seen: int, pad: int = 0) -> list[np.ndarray]:
        """`chunk` from `state`; `seen`: events in the window after it (the history input), then `pad` zeros
        (the service pads the windows of one call to the longest)."""
        feed = {"action_ids": chunk, "h": state[0]} | ({"c": state[1]} if lstm else {})
        if history:
            feed["history"] = np.pad(ids[:, :seen], ((0, 0), (0, pad)), constant_values=PAD_ID)
        try:
            return [np.asarray(x) for x in step.run(None, feed)]
        except Exception as e:  # onnxruntime raises its own exception types
            raise ParityError(
                f"{step_path}: ONNX Runtime cannot run the step graph on {chunk.shape}: {e}"
            ) from e

    def compare(got: np.ndarray, n: int, how: str) -> float:
        (want,) = full.run(None, {"action_ids": ids[:, :n], "lengths": np.full(b, n, dtype=np.int64)})
        diff = (
            float(np.max(np.abs(got.astype(np.float64) - want))) if got.shape == want.shape else float("inf")
        )
        if not np.isfinite(diff) or diff > tolerance:
            raise ParityError(
                f"{step_path}: step graph and {MODEL_FILE} disagree after {n} events ({how}): "
                f"max |difference| {diff:.3g} > {tolerance:g} (shape {got.shape} vs {want.shape})"
            )
        return diff

    zero = [np.zeros((layers, b, hidden), dtype=np.float32) for _ in range(2 if lstm else 1)]
    worst, state = 0.0, zero
    for n in range(1, t + 1):  # one event at a time
        probs, *state = run_step(ids[:, n - 1 : n], state, n)
        worst = max(worst, compare(probs, n, "one event per call"))
    for n in sorted({1, 2, manifest.window // 2 or 1, manifest.window, t}):  # whole history at once
        probs, *_ = run_step(ids[:, :n], zero, n)
        worst = max(worst, compare(probs, n, "whole history in one call"))
        if history:
            probs, *_ = run_step(ids[:, :n], zero, n, pad=3)
            worst = max(worst, compare(probs, n, "whole history in one call, window input padded"))
    state = zero
    for start in range(0, t, 3):  # chunks of 3 carried across calls
        probs, *state = run_step(ids[:, start : start + 3], state, min(start + 3, t))
        worst = max(worst, compare(probs, min(start + 3, t), "3 events per call"))
    return worst


def export_step(artifact_dir: Path, tolerance: float = TOLERANCE) -> StepSpec:
    """Export step.onnx from the artifact's checkpoint.pt, gate it, move it into place, record it in the manifest."""
    artifact_dir = Path(artifact_dir)
    manifest = read_manifest(artifact_dir)
    model, _ = load_checkpoint(artifact_dir)
    final, tmp = artifact_dir / STEP_FILE, artifact_dir / (STEP_FILE + ".tmp")
    try:
        export_step_onnx(model, tmp)
        shape = (model.config.num_layers, state_width(model))
        diff = check_step_parity(artifact_dir, tmp, tolerance, state_shape=shape)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sha = hashlib.sha256(tmp.read_bytes()).hexdigest()[:16]
    os.replace(tmp, final)
    spec = step_spec(model, sha, diff)
    write_manifest(artifact_dir, manifest.model_copy(update={"step": spec}))
    return spec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.step", description=export_step.__doc__)
    parser.add_argument("--artifact", type=Path, required=True, help="artifact directory with checkpoint.pt")
    args = parser.parse_args(argv)
    spec = export_step(args.artifact)
    sys.stdout.write(
        f"{args.artifact / spec.file}: parity {spec.parity_max_abs_diff:.2e}, sha256 {spec.sha256}\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
