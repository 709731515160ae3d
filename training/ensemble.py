"""`--ensemble K`: K models of one configuration (seeds seed .. seed + K - 1) averaged in one exported graph.

model.onnx keeps its contract: the ensemble's `forward` is the mean of the members' next-action
probabilities (softmax, then mean), so its rows still sum to 1 and PAD/UNK stay at exactly 0. In step.onnx
the recurrent state is the members' states concatenated along the hidden axis, (L, B, K * H), which the
service stores as the opaque float32 vector the manifest's `step.state_shape` sizes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from training.config import ModelConfig
from training.knn_blend import KnnBlend
from training.model import NextActionModel


class EnsembleModel(nn.Module):
    """Members of one configuration; forward (B, T), (B,) -> (B, V) is the mean of their probabilities."""

    def __init__(self, members: Sequence[NextActionModel]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        configs = {m.config for m in members}
        if len(configs) != 1:
            raise ValueError(f"ensemble members must share one configuration, got {len(configs)}")
        self.members = nn.ModuleList(members)
        self.config: ModelConfig = members[0].config

    def __len__(self) -> int:
        return len(self.members)

    def forward(self, action_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Next-action probabilities (B, V): the mean of the members' (the exported graph)."""
        probs = torch.stack([m(action_ids, lengths) for m in self.members])  # (K, B, V)
        return probs.mean(dim=0)  # (B, V)

    def final_logits(self, action_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Log of the mean probabilities (B, V), PAD and UNK at -inf: what validation ranks and scores."""
        return torch.log(self(action_ids, lengths))  # (B, V)


AnyModel = NextActionModel | EnsembleModel | KnnBlend


def recurrent(model: AnyModel) -> NextActionModel | EnsembleModel:
    """The recurrent part of `model`: itself, or a `--knn-blend` model's inner model."""
    return model.model if isinstance(model, KnnBlend) else model  # type: ignore[return-value]


def members(model: AnyModel) -> list[NextActionModel]:
    """The single models that make up `model` (itself, for a single model)."""
    inner = recurrent(model)
    return list(inner.members) if isinstance(inner, EnsembleModel) else [inner]  # type: ignore[arg-type]


def state_width(model: AnyModel) -> int:
    """Width of step.onnx's h (and c): the members' hidden states side by side."""
    return model.config.hidden_dim * len(members(model))
