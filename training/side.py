"""Side information (`train --side-col COLUMN`): a column that describes the action, such as an item's category.

Each action gets one side value (the one it occurs with most often in the file's rows that have a user; ties:
the value that appears first in the file), and the model learns one more embedding per side value, added to
each action's own (training/model.py). Actions seen once or twice then share what their category's other
actions taught the model.

The side values are a function of the action, so the sum is a fixed table: `fold` writes it into the plain
embedding and output layer before export. model.onnx, step.onnx and the manifest are exactly those of a model
without side information; the service never sees the column.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from app.manifest import UNK_ID
from training.config import DataOptions
from training.errors import DataError
from training.events import EventLog
from training.vocab import Vocabulary

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SideInfo:
    """Per action id, its side value (1..values; 0: none, for PAD, UNK and actions without one)."""

    column: str
    side_of: tuple[int, ...]  # (V,)
    values: int  # distinct side values among the vocabulary's actions
    covered: int  # vocabulary actions with a side value
    conflicting: int  # actions seen with more than one side value (the most frequent is kept)

    def summary(self) -> dict[str, object]:
        return {
            "column": self.column,
            "values": self.values,
            "actions_covered": self.covered,
            "actions_with_several_values": self.conflicting,
        }


def side_info(options: DataOptions, vocabulary: Vocabulary, events: EventLog) -> SideInfo:
    """Give each vocabulary action its side value, from what `load_events` read of `options.side_col` in the
    same pass as the events (`events.side`)."""
    column, path = options.side_col, Path(options.path)
    if not column or events.side is None or events.side.column != column:
        raise ValueError("side_info needs the events loaded with options.side_col")
    ids = vocabulary.lookup(events.tokens)  # (A,) action code -> id (UNK for actions outside the vocabulary)
    learned = ids > UNK_ID
    known = learned & (events.side.best >= 0)
    if not known.any():
        raise DataError(
            f"{path}: --side-col {column!r} has no value on any row of the {len(vocabulary) - 2:,} actions the "
            "model learns: check the column, or train without --side-col"
        )
    used, compact = np.unique(events.side.best[known], return_inverse=True)  # side codes -> 1..S
    side_of = np.zeros(len(vocabulary), dtype=np.int64)
    side_of[ids[known]] = compact + 1
    conflicting = int((events.side.several & learned).sum())
    info = SideInfo(
        column=column,
        side_of=tuple(int(v) for v in side_of),
        values=len(used),
        covered=int(known.sum()),
        conflicting=conflicting,
    )
    log.info(
        "side information %r: %d values over %d of %d actions (%d seen with several; the most frequent kept)",
        column,
        info.values,
        info.covered,
        len(vocabulary) - 2,
        conflicting,
    )
    return info


def fold(model: torch.nn.Module) -> torch.nn.Module:
    """The same model with its side tables added into the plain ones (an ensemble or a blend is rebuilt around
    its folded members): its outputs are unchanged and its config has no side_of, so export, step.onnx, the
    checkpoint and the manifest are a plain model's. A model without side information is returned as it is."""
    from training.ensemble import EnsembleModel
    from training.knn_blend import KnnBlend
    from training.model import NextActionModel

    if isinstance(model, KnnBlend):
        return KnnBlend(fold(model.model), model.prior, model.beta, model.gamma).train(model.training)
    if isinstance(model, EnsembleModel):
        folded = [fold(m) for m in model.members]
        return EnsembleModel(folded)  # type: ignore[arg-type]
    assert isinstance(model, NextActionModel)
    if model.side is None:
        return model
    plain = NextActionModel(dataclasses.replace(model.config, side_of=None)).to(model.head.bias.device)
    state = {
        k: v
        for k, v in model.state_dict().items()
        if not k.startswith(("side.", "side_out.")) and k != "side_of"
    }
    with torch.no_grad():
        all_ids = torch.arange(model.config.vocab_size, device=model.head.bias.device)
        state["embedding.weight"] = model.embed(all_ids).detach().clone()  # (V, E)
        if not model.config.tied:
            state["head.weight"] = model.output_rows().detach().clone()  # (V, H)
        else:
            state["head.weight"] = state["embedding.weight"]
    plain.load_state_dict(state)
    plain.train(model.training)
    return plain
