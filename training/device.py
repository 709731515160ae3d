"""Where training runs: the device (`--device cuda|cpu|auto`) and mixed precision (`--amp`).

Mixed precision autocasts the embedding, the LSTM/GRU and the output layer to bfloat16 (or float16 where a GPU
has no bfloat16, with a gradient scaler); the loss and the softmax stay in float32. On the CPU it is off:
the CPU kernels of the recurrent layers gain nothing from it. The model always returns to the CPU after
training, so the export and its parity gate run exactly as before.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from typing import Literal

import torch

from training.errors import TrainingError

DeviceName = Literal["auto", "cuda", "cpu"]
AmpName = Literal["auto", "bf16", "fp16", "off"]


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """cuda (this process's GPU under torchrun) or cpu; auto picks cuda when one is available."""
    if name not in ("auto", "cuda", "cpu") and not name.startswith("cuda:"):
        raise TrainingError(f"--device {name!r}: expected auto, cuda or cpu")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise TrainingError(f"--device {name}: no CUDA device is available (torch {torch.__version__})")
    if name.startswith("cuda:"):
        return torch.device(name)
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def prepare_device(device: torch.device) -> None:
    """Make a GPU run repeatable: deterministic cuDNN and kernels (same seed, same device: same model)."""
    if device.type != "cuda":
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.cuda.set_device(device)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


def amp_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """The autocast dtype, or None for full precision (always on the CPU)."""
    if amp not in ("auto", "bf16", "fp16", "off"):
        raise TrainingError(f"--amp {amp!r}: expected auto, bf16, fp16 or off")
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16  # auto on a GPU without bfloat16 (before Ampere)


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager[object]:
    """Autocast to `dtype` on `device`; nothing when dtype is None."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """Loss scaling for float16 (bfloat16 has float32's range and needs none); a no-op otherwise."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
