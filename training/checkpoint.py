"""checkpoint.pt: the model's state_dict, its config and its vocabulary, as plain tensors, dicts and lists.

Never a pickled object: it loads with `torch.load(path, weights_only=True)` in any later version of the code.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from training.config import ModelConfig
from training.ensemble import AnyModel, EnsembleModel, members, recurrent
from training.errors import ArtifactError
from training.knn_blend import KnnBlend, KnnPrior
from training.model import NextActionModel
from training.vocab import Vocabulary

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = 1


def save_checkpoint(path: Path, model: AnyModel, vocabulary: Vocabulary) -> Path:
    """Write {"format", "config", "state_dict", "vocabulary"} to `path`, and for an ensemble "members" (K):
    then the state_dict is the ensemble's (members.0.embedding.weight, ...) and `config` each member's. A
    `--knn-blend` model adds "knn_blend" (beta and the prior's table sizes); its state_dict holds the inner
    model's (model.embedding.weight, ...) and the prior's tables (prior.neighbours, ...)."""
    config = dataclasses.asdict(model.config)
    if config.get("side_of") is None:  # a plain model (`--side-col` folded): the config earlier versions read
        config.pop("side_of", None)
        config.pop("side_own_scale", None)
    payload: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "config": config,
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "vocabulary": list(vocabulary.tokens),
    }
    if isinstance(recurrent(model), EnsembleModel):
        payload["members"] = len(members(model))
    if isinstance(model, KnnBlend):  # the prior's tables are in the state_dict (prior.neighbours, ...)
        payload["knn_blend"] = {
            "beta": model.beta,
            "gamma": model.gamma,
            "neighbours": int(model.prior.neighbours.shape[1]),
            "recent": int(model.prior.weights.shape[0]),
        }
    torch.save(payload, path)
    return path


def load_checkpoint(path: Path) -> tuple[AnyModel, Vocabulary]:
    """The model (in eval mode) and vocabulary saved in `path` (a checkpoint.pt or the directory holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise ArtifactError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or foreign files
        raise ArtifactError(f"{path}: not a readable checkpoint: {e}") from e
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ArtifactError(f"{path}: not a nextact checkpoint (format {CHECKPOINT_FORMAT} expected)")
    try:
        config = ModelConfig(**payload["config"])
        k = payload.get("members")
        model: AnyModel = (
            NextActionModel(config)
            if k is None
            else EnsembleModel([NextActionModel(config) for _ in range(int(k))])
        )
        blend = payload.get("knn_blend")
        if blend is not None:
            prior = KnnPrior(config.vocab_size, int(blend["neighbours"]), int(blend["recent"]))
            model = KnnBlend(model, prior, float(blend["beta"]), float(blend.get("gamma", 0.0)))
        model.load_state_dict(payload["state_dict"])
        vocabulary = Vocabulary(payload["vocabulary"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise ArtifactError(f"{path}: inconsistent checkpoint: {e}") from e
    if len(vocabulary) != config.vocab_size:
        raise ArtifactError(
            f"{path}: vocabulary has {len(vocabulary)} actions, config says {config.vocab_size}"
        )
    return model.eval(), vocabulary
