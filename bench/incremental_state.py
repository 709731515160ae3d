"""Issue 5 item 5, exploration only: does a single-step graph (state in, one event, state + probabilities out)
beat recomputing the whole window, and what does it do to quality?

    python bench/incremental_state.py --artifact-dir artifacts/beauty [--data amazon_beauty.csv] [--users 5000]

Speed: ONNX Runtime on the exported model.onnx (B windows of T events) against a single-step graph
exported here from checkpoint.pt (B events + B states), per batch size, one intra-op thread.
Quality: HR@10 / NDCG@10 over the full vocabulary on the same held-out users (leave-one-out: each user's
last event is the target): full-window recompute on the last `window` events, as served today, against a
state carried step by step over the user's whole history (what a state kept in Redis would hold when it is
never recomputed). Writes bench/results/incremental_state.{json,md}; the service is not touched.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np
import torch
from torch import nn

from bench.harness import RESULTS, read_sequences
from training.model import NextActionModel


class SingleStep(nn.Module):
    """One event per row on top of the previous recurrent state: the same weights as NextActionModel."""

    def __init__(self, model: NextActionModel) -> None:
        super().__init__()
        self.m = model
        self.lstm = isinstance(model.rnn, nn.LSTM)

    def forward(self, action_ids: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.m.embedding(action_ids).unsqueeze(1)  # (B, 1, E)
        if self.lstm:
            out, (h2, c2) = self.m.rnn(x, (h, c))  # (B, 1, H), (L, B, H) x2
        else:
            out, h2 = self.m.rnn(x, h)
            c2 = c
        probs = torch.softmax(self.m.logits(out[:, 0]), dim=-1)  # (B, V)
        return probs, h2, c2


def export_step(model: NextActionModel, path: Path) -> None:
    cfg = model.config
    step = SingleStep(model).eval()
    ids = torch.tensor([2, 3], dtype=torch.long)
    h = torch.zeros(cfg.num_layers, 2, cfg.hidden_dim)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            step,
            (ids, h, h.clone()),
            str(path),
            input_names=["action_ids", "h", "c"],
            output_names=["probabilities", "h_out", "c_out"],
            opset_version=17,
            dynamo=False,
            dynamic_axes={
                "action_ids": {0: "batch"},
                "h": {1: "batch"},
                "c": {1: "batch"},
                "probabilities": {0: "batch"},
                "h_out": {1: "batch"},
                "c_out": {1: "batch"},
            },
        )


def session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def median_ms(fn: Any, budget_s: float, max_reps: int = 300) -> float:
    fn()
    fn()
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < max_reps and (len(times) < 5 or time.perf_counter() < deadline):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def speed(
    full: Any, step: Any, cfg: Any, window: int, vocab: int, batches: list[int], budget: float
) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for b in batches:
        ids = rng.integers(2, vocab, size=(b, window), dtype=np.int64)  # (B, T)
        lengths = np.full(b, window, dtype=np.int64)  # (B,)
        one = rng.integers(2, vocab, size=b, dtype=np.int64)  # (B,)
        h = rng.standard_normal((cfg.num_layers, b, cfg.hidden_dim)).astype(np.float32) * 0.1  # (L, B, H)
        feed_full = {"action_ids": ids, "lengths": lengths}
        feed_step = {"action_ids": one, "h": h, "c": h}
        t_full = median_ms(lambda f=feed_full: full.run(None, f), budget)
        t_step = median_ms(lambda f=feed_step: step.run(None, f), budget)
        rows.append(
            {
                "batch": b,
                "full_window_ms": round(t_full, 3),
                "single_step_ms": round(t_step, 3),
                "speedup": round(t_full / t_step, 2),
            }
        )
        print(
            f"B={b:<4} full T={window}: {t_full:8.3f} ms   single step: {t_step:7.3f} ms   x{t_full / t_step:.1f}",
            file=sys.stderr,
        )
    return rows


def ranks(probs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """0-based rank of each target among all actions (PAD/UNK have probability 0; ties count against)."""
    p_target = probs[np.arange(len(targets)), targets][:, None]  # (B, 1)
    return (probs >= p_target).sum(axis=1) - 1  # (B,)


def quality(
    model: NextActionModel,
    full: Any,
    step: Any,
    histories: list[np.ndarray],
    targets: np.ndarray,
    window: int,
    k: int = 10,
    batch: int = 256,
) -> dict[str, Any]:
    cfg = model.config
    full_ranks, step_ranks = [], []
    max_diff = 0.0
    for start in range(0, len(histories), batch):
        hs = histories[start : start + batch]
        tg = targets[start : start + batch]
        kept = [h[-window:] for h in hs]
        width = max(len(h) for h in kept)
        ids = np.zeros((len(hs), width), dtype=np.int64)  # (B, T) right-padded
        for i, h in enumerate(kept):
            ids[i, : len(h)] = h
        lengths = np.array([len(h) for h in kept], dtype=np.int64)
        (p_full,) = full.run(["probabilities"], {"action_ids": ids, "lengths": lengths})
        full_ranks.append(ranks(p_full, tg))
        # the carried state: every event of the history, one step at a time (rows that ran out keep theirs)
        n = len(hs)
        h = np.zeros((cfg.num_layers, n, cfg.hidden_dim), dtype=np.float32)
        c = np.zeros_like(h)
        p_step = np.zeros_like(p_full)
        longest = max(len(x) for x in hs)
        for t in range(longest):
            live = np.array([i for i, x in enumerate(hs) if len(x) > t])
            one = np.array([hs[i][t] for i in live], dtype=np.int64)
            p, h2, c2 = step.run(None, {"action_ids": one, "h": h[:, live], "c": c[:, live]})
            h[:, live], c[:, live] = h2, c2
            p_step[live] = p
        step_ranks.append(ranks(p_step, tg))
        max_diff = max(max_diff, float(np.abs(p_full - p_step).max()))
    fr, sr = np.concatenate(full_ranks), np.concatenate(step_ranks)

    def metrics(r: np.ndarray) -> dict[str, float]:
        hit = r < k
        return {
            f"hr@{k}": round(float(hit.mean()), 4),
            f"ndcg@{k}": round(float(np.where(hit, 1 / np.log2(r + 2), 0).mean()), 4),
        }

    longer = np.array([len(h) > window for h in histories])
    return {
        "users": len(histories),
        "users_longer_than_window": int(longer.sum()),
        "full_window": metrics(fr),
        "incremental": metrics(sr),
        "full_window_long_users": metrics(fr[longer]) if longer.any() else None,
        "incremental_long_users": metrics(sr[longer]) if longer.any() else None,
        "same_target_rank_share": round(float((fr == sr).mean()), 4),
        "max_abs_probability_difference": max_diff,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact-dir", type=Path, default=ROOT / "artifacts" / "beauty")
    p.add_argument("--data", type=Path, help="event CSV (default: the model's training file)")
    p.add_argument("--users", type=int, default=5000, help="held-out users evaluated (bounded)")
    p.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 64, 256])
    p.add_argument("--budget-s", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS / "incremental_state")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from app.manifest import read_manifest
    from training.checkpoint import load_checkpoint

    manifest = read_manifest(args.artifact_dir)
    model, vocab = load_checkpoint(args.artifact_dir)
    if model.history_bias is not None:
        sys.exit(
            f"{args.artifact_dir}: this exploration's single-step graph has no window input, so it needs a model "
            "trained with --no-history-bias (the service's step.onnx from `train` handles history bias)"
        )
    cfg = model.config
    data = args.data or Path(manifest.data.file)
    col = manifest.data.action_columns[0]
    index = {t: i for i, t in enumerate(vocab.tokens) if i > 1}
    seqs = [s for s in read_sequences(data, col) if len(s) >= 2]
    rng = np.random.default_rng(0)
    chosen = rng.choice(len(seqs), size=min(args.users, len(seqs)), replace=False)
    histories = [np.array([index.get(a, 1) for a in seqs[i][:-1]], dtype=np.int64) for i in chosen]
    targets = np.array([index.get(seqs[i][-1], 1) for i in chosen], dtype=np.int64)

    with tempfile.TemporaryDirectory() as tmp:
        step_path = Path(tmp) / "step.onnx"
        export_step(model, step_path)
        full, step = session(args.artifact_dir / "model.onnx", args.threads), session(step_path, args.threads)
        # the step graph reproduces the full model on a one-event window
        one = np.array([5, 7], dtype=np.int64)
        zeros = np.zeros((cfg.num_layers, 2, cfg.hidden_dim), dtype=np.float32)
        (pf,) = full.run(
            ["probabilities"], {"action_ids": one[:, None], "lengths": np.ones(2, dtype=np.int64)}
        )
        ps = step.run(None, {"action_ids": one, "h": zeros, "c": zeros})[0]
        parity = float(np.abs(pf - ps).max())
        rows = speed(full, step, cfg, manifest.window, manifest.vocab_size, args.batch_sizes, args.budget_s)
        q = quality(model, full, step, histories, targets, manifest.window)
    result = {
        "model": {
            "cell": cfg.cell,
            "vocab": cfg.vocab_size,
            "window": manifest.window,
            "embedding": cfg.embedding_dim,
            "hidden": cfg.hidden_dim,
            "layers": cfg.num_layers,
            "version": manifest.model_version,
        },
        "data": str(data),
        "threads": args.threads,
        "step_parity_max_abs_diff": parity,
        "speed": rows,
        "quality": q,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    md = [
        (
            f"Single-step graph vs full-window recompute ({cfg.cell.upper()}, hidden {cfg.hidden_dim}, vocabulary "
            f"{cfg.vocab_size:,}, window {manifest.window}; ONNX Runtime CPU, {args.threads} thread; one-event "
            f"parity {parity:.1e})"
        ),
        "",
        "| batch | full window ms | single step ms | speed-up |",
        "|---:|---:|---:|---:|",
        *[
            f"| {r['batch']} | {r['full_window_ms']:.3f} | {r['single_step_ms']:.3f} | {r['speedup']:.1f}x |"
            for r in rows
        ],
        "",
        (
            f"Quality on {q['users']:,} held-out users of {data.name} (leave-one-out, full ranking; "
            f"{q['users_longer_than_window']:,} have more history than the window):"
        ),
        "",
        "| scorer | HR@10 | NDCG@10 |",
        "|---|---:|---:|",
        f"| full-window recompute (served today) | {q['full_window']['hr@10']} | {q['full_window']['ndcg@10']} |",
        f"| incremental state over the whole history | {q['incremental']['hr@10']} | {q['incremental']['ndcg@10']} |",
        "",
        (
            f"Largest difference in any probability between the two: {q['max_abs_probability_difference']:.1e}; "
            f"the target's rank is the same for {q['same_target_rank_share']:.1%} of users."
        ),
    ]
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
