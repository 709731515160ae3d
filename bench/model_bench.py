"""Model-level micro-benchmark: ONNX Runtime (as the service loads it) vs PyTorch eager, same weights.

    python bench/model_bench.py --artifact-dir artifacts/beauty [--device cpu|cuda] [--json out.json]
    python bench/model_bench.py --artifact-dir artifacts/beauty256 --profile   # one call taken apart

`--profile` (bench/model_profile.py): the service's incremental inference call per stage (encode, step
graph, feed glue, top-k decode), ONNX Runtime's per-operator profile of step.onnx, and the micro-batcher's
hand-off, warm and cold (--gap-ms of idle before each call); writes bench/results/model_profile.{json,md}.

For every window length T and batch size B: full windows of random known action ids (B, T), timed
over repeated calls (bounded by --budget-s per cell and --max-reps), median and p90 per call.
PyTorch runs checkpoint.pt's state_dict in NextActionModel under inference_mode, batch by batch,
which is what a plain FastAPI + PyTorch service does. The provider ONNX Runtime really used is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np

CUDA = "CUDAExecutionProvider"


def load_torch_model(artifact_dir: Path, device: str) -> Any:
    """NextActionModel with checkpoint.pt's weights (training's own loader), in eval mode on `device`."""
    from training.checkpoint import load_checkpoint

    model, _ = load_checkpoint(artifact_dir)
    return model.eval().to(device)


def bound_call(serving: Any, feed: dict[str, np.ndarray], names: list[str]) -> Callable[[], Any]:
    """CUDA: inputs copied to the device once and the output left there (I/O binding), i.e. the graph alone."""
    import onnxruntime as ort

    binding = serving.session.io_binding()
    for name, value in feed.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
    for name in names:
        binding.bind_output(name, "cuda", 0)

    def call() -> Any:
        serving.session.run_with_iobinding(binding)
        binding.synchronize_outputs()

    return call


def timed(
    fn: Callable[[], Any], budget_s: float, max_reps: int, sync: Callable[[], None]
) -> dict[str, float]:
    for _ in range(2):  # warm-up: allocator, kernels, thread pools
        fn()
    sync()
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < max_reps and (len(times) < 3 or time.perf_counter() < deadline):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    times.sort()
    return {
        "median_ms": round(statistics.median(times) * 1000, 3),
        "p90_ms": round(times[min(len(times) - 1, int(0.9 * len(times)))] * 1000, 3),
        "reps": len(times),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    from app.model import load_model

    ort_threads = args.ort_threads if args.ort_threads is not None else args.threads
    torch_threads = args.torch_threads if args.torch_threads is not None else args.threads
    serving = load_model(args.artifact_dir, device=args.device, intra_op_threads=ort_threads)
    manifest = serving.manifest
    torch_device = "cuda" if args.device == "cuda" and torch.cuda.is_available() else "cpu"
    if torch_threads:
        torch.set_num_threads(torch_threads)
    net = load_torch_model(args.artifact_dir, torch_device)
    sync = torch.cuda.synchronize if torch_device == "cuda" else (lambda: None)
    rng = np.random.default_rng(0)
    names = [manifest.io.probabilities]
    inputs = (manifest.io.action_ids, manifest.io.lengths)

    # the two must compute the same thing, or the comparison means nothing
    ids = rng.integers(2, manifest.vocab_size, size=(8, manifest.window), dtype=np.int64)
    lengths = np.full(8, manifest.window, dtype=np.int64)
    (p_ort,) = serving.session.run(names, {inputs[0]: ids, inputs[1]: lengths})
    with torch.inference_mode():
        p_torch = (
            net(torch.from_numpy(ids).to(torch_device), torch.from_numpy(lengths).to(torch_device))
            .cpu()
            .numpy()
        )
    parity = float(np.max(np.abs(p_ort - p_torch)))

    rows = []
    for window in args.windows:
        for batch in args.batch_sizes:
            ids = rng.integers(2, manifest.vocab_size, size=(batch, window), dtype=np.int64)  # (B, T)
            lengths = np.full(batch, window, dtype=np.int64)  # (B,)
            feed = {inputs[0]: ids, inputs[1]: lengths}
            t_ids, t_len = torch.from_numpy(ids).to(torch_device), torch.from_numpy(lengths).to(torch_device)

            def ort_call(feed: dict[str, np.ndarray] = feed) -> Any:
                return serving.session.run(names, feed)

            def torch_call(t_ids: Any = t_ids, t_len: Any = t_len) -> Any:
                with torch.inference_mode():
                    return net(t_ids, t_len)

            o = timed(ort_call, args.budget_s, args.max_reps, lambda: None)
            t = timed(torch_call, args.budget_s, args.max_reps, sync)
            bound = None
            if serving.provider == CUDA:
                bound = timed(bound_call(serving, feed, names), args.budget_s, args.max_reps, lambda: None)
            rows.append(
                {
                    "window": window,
                    "batch": batch,
                    "ort_ms": o["median_ms"],
                    "ort_p90_ms": o["p90_ms"],
                    "ort_reps": o["reps"],
                    "torch_ms": t["median_ms"],
                    "torch_p90_ms": t["p90_ms"],
                    "torch_reps": t["reps"],
                    "ort_rows_per_s": round(batch / o["median_ms"] * 1000, 1),
                    "torch_rows_per_s": round(batch / t["median_ms"] * 1000, 1),
                    "speedup": round(t["median_ms"] / o["median_ms"], 2),
                    **({"ort_iobinding_ms": bound["median_ms"]} if bound else {}),
                }
            )
            if not args.quiet:
                r = rows[-1]
                print(
                    f"T={window:<4} B={batch:<4} ort {r['ort_ms']:8.3f} ms  torch {r['torch_ms']:8.3f} ms  "
                    f"x{r['speedup']}",
                    file=sys.stderr,
                )
    return {
        "model": {
            "cell": manifest.cell,
            "vocab": manifest.vocab_size,
            "window": manifest.window,
            "embedding": manifest.embedding_dim,
            "hidden": manifest.hidden_dim,
            "layers": manifest.num_layers,
            "version": manifest.model_version,
        },
        "device_requested": args.device,
        "ort_provider": serving.provider,
        "ort_providers_available": ort.get_available_providers(),
        "ort_version": ort.__version__,
        "ort_intra_op_threads": ort_threads or "default",
        "torch_device": torch_device,
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "parity_max_abs_diff": parity,
        "rows": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        (
            f"ONNX Runtime {result['ort_version']} on {result['ort_provider']} vs PyTorch {result['torch_version']} "
            f"eager on {result['torch_device']}; threads: ORT {result['ort_intra_op_threads']}, PyTorch "
            f"{result['torch_threads']}; one process, no HTTP; median per call; max |p_ort - p_torch| = "
            f"{result['parity_max_abs_diff']:.2e}"
        ),
        "",
        "| window | batch | ORT ms/call | PyTorch ms/call | ORT rows/s | PyTorch rows/s | ORT speed-up |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    if any("ort_iobinding_ms" in r for r in result["rows"]):
        lines += [
            "",
            "ORT with I/O binding (inputs on the device, output left there), ms/call: "
            + ", ".join(
                f"T={r['window']} B={r['batch']}: {r['ort_iobinding_ms']:.3f}" for r in result["rows"]
            ),
        ]
    for r in result["rows"]:
        lines.append(
            f"| {r['window']} | {r['batch']} | {r['ort_ms']:.3f} | {r['torch_ms']:.3f} | "
            f"{r['ort_rows_per_s']:,.0f} | {r['torch_rows_per_s']:,.0f} | {r['speedup']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact-dir", type=Path, default=ROOT / "artifacts" / "beauty")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    p.add_argument(
        "--batch-sizes",
        type=lambda s: [int(x) for x in s.split(",")],
        help="(default 1,8,64,256; with --profile 1,8,20,64)",
    )
    p.add_argument("--windows", type=lambda s: [int(x) for x in s.split(",")], default=[10, 50])
    p.add_argument("--budget-s", type=float, default=1.0, help="timing budget per cell and runtime")
    p.add_argument("--max-reps", type=int, default=200)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads of both runtimes (0 = each one's default: one per core). 1 by default: "
        "the fair like-for-like setting, and on a small shared machine the only stable one",
    )
    p.add_argument("--ort-threads", type=int, help="ONNX Runtime intra-op threads (overrides --threads)")
    p.add_argument("--torch-threads", type=int, help="torch.set_num_threads (overrides --threads)")
    p.add_argument("--json", type=Path, help="write the result here")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--profile", action="store_true", help="take one inference call apart (see above)")
    p.add_argument("--calls", type=int, default=200, help="--profile: calls per cell")
    p.add_argument("--gap-ms", type=float, default=10.0, help="--profile: idle before each cold call")
    p.add_argument(
        "--caches",
        type=lambda s: tuple(x for x in s.split(",") if x in ("warm", "cold")),
        default=("warm", "cold"),
        help="--profile: warm,cold (default both)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=ROOT / "bench" / "results" / "model_profile",
        help="--profile: results path",
    )
    args = p.parse_args(argv)
    if args.profile:
        return profile_main(args, argv)
    args.batch_sizes = args.batch_sizes or [1, 8, 64, 256]
    from app.model import ModelLoadError

    try:
        result = run(args)
    except ModelLoadError as e:
        print(f"model_bench: {e}", file=sys.stderr)
        return 2
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    return 0


def profile_main(args: argparse.Namespace, argv: list[str] | None) -> int:
    from bench import model_profile

    threads = args.ort_threads if args.ort_threads is not None else args.threads
    result = model_profile.profile(
        args.artifact_dir, args.batch_sizes or [1, 8, 20, 64], threads, args.calls, args.gap_ms, args.caches
    )
    command = " ".join(["python", "bench/model_bench.py", *(sys.argv[1:] if argv is None else argv)])
    result["command"] = command
    text = model_profile.markdown(result, command)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
