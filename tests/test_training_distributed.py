"""torchrun with two gloo processes: the run completes, only rank 0 writes the artifact, and its metrics are
close to one process's with the same effective batch (2 x 16 windows against 1 x 32)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.manifest import MANIFEST_FILE, MODEL_FILE, read_manifest

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "taobao_sample.csv"
COMMON = [
    "--data", str(DATA), "--action-col", "behavior", "--window", "20", "--epochs", "3", "--embedding-dim", "16",
    "--hidden-dim", "16", "--no-step", "--quiet", "--seed", "5", "--device", "cpu", "--threads", "1",
]  # fmt: skip


def _start(cmd: list[str]) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait(proc: subprocess.Popen[str]) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"{' '.join(map(str, proc.args))}\n{out}\n{err}"  # type: ignore[arg-type]
    return out


@pytest.mark.skipif(sys.platform == "win32", reason="torchrun's gloo rendezvous on loopback")
def test_two_gloo_processes_train_one_artifact_close_to_one_process(tmp_path: Path) -> None:
    ddp_out, single_out = tmp_path / "ddp", tmp_path / "single"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone"]
    ddp = _start([*torchrun, "-m", "training", "train", "--out", str(ddp_out), *COMMON, "--batch-size", "16"])
    single = _start(
        [sys.executable, "-m", "training", "train", "--out", str(single_out), *COMMON, "--batch-size", "32"]
    )
    ddp_stdout, single_stdout = _wait(ddp), _wait(single)  # both at once: half the wall time on two cores

    result = json.loads(ddp_stdout)  # one JSON object: only rank 0 prints (and writes)
    assert result["artifact"] == str(ddp_out) and result["training"]["batch_size"] == 16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "single"]
    assert (ddp_out / MODEL_FILE).is_file() and (ddp_out / MANIFEST_FILE).is_file()
    assert not list(ddp_out.glob("*.tmp*"))
    manifest = read_manifest(ddp_out)
    alone = json.loads(single_stdout)["metrics"]["full"]["model"]
    together = manifest.metrics["full"]["model"]
    for metric in ("hr@1", "ndcg@10", "mrr@10"):
        assert abs(together[metric] - alone[metric]) < 0.1, (metric, together[metric], alone[metric])
    assert manifest.training.epochs_run >= 1
