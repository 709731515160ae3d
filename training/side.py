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
from training.events import _action_codes, _token_codes
from training.tables import read_table
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


def side_info(options: DataOptions, vocabulary: Vocabulary) -> SideInfo:
    """Read `options.side_col` beside the action columns and give each vocabulary action its side value."""
    column, path, action_cols = options.side_col, Path(options.path), options.action_cols
    if not column:
        raise ValueError("side_info needs options.side_col")
    roles = {c: "an action column" for c in action_cols} | {options.user_col: "the user column"}
    if options.time_col:
        roles[options.time_col] = "the time column"
    if column in roles:
        raise DataError(f"--side-col {column!r} is {roles[column]}: name a column that describes the action")
    try:
        table = read_table(path, [options.user_col, *action_cols, column], frozenset())
    except DataError as e:
        raise DataError(f"--side-col {column!r}: {e}") from e
    users, _ = _token_codes(table.data.column(options.user_col))
    actions, tokens = _action_codes(table.data, action_cols)  # the same tokens as load_events makes
    side, side_tokens = _token_codes(table.data.column(column))
    if not side_tokens:
        raise DataError(f"{path}: --side-col {column!r} has no values")
    ids = vocabulary.lookup(tokens)  # (A,) action code -> id (UNK for actions outside the vocabulary)
    keep = (users >= 0) & (actions >= 0) & (side >= 0)  # the rows load_events keeps, with a side value
    action_ids = ids[actions[keep]]
    known = action_ids > UNK_ID
    pair = action_ids[known].astype(np.int64) * len(side_tokens) + side[keep][known]
    uniq, counts = np.unique(pair, return_counts=True)  # (P,) ascending: by action id, then side code
    pair_action, pair_side = uniq // len(side_tokens), uniq % len(side_tokens)
    # the most frequent side value per action: sort by (action, -count), then the first of each action
    order = np.lexsort((-counts, pair_action))
    first = np.ones(len(order), dtype=bool)
    first[1:] = pair_action[order][1:] != pair_action[order][:-1]
    best_action, best_side = pair_action[order][first], pair_side[order][first]
    conflicting = int(len(uniq) - len(best_action))
    if not len(best_action):
        raise DataError(
            f"{path}: --side-col {column!r} has no value on any row of the {len(vocabulary) - 2:,} actions the "
            "model learns: check the column, or train without --side-col"
        )
    used, compact = np.unique(best_side, return_inverse=True)  # side codes -> 1..S
    side_of = np.zeros(len(vocabulary), dtype=np.int64)
    side_of[best_action] = compact + 1
    info = SideInfo(
        column=column,
        side_of=tuple(int(v) for v in side_of),
        values=len(used),
        covered=len(best_action),
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
