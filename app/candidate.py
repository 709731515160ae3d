"""The live model and an optional candidate beside it: shadow or canary routing, and promotion.

What a request works with is one immutable `Served` snapshot, taken once; installing a model, loading a
candidate and promoting each replace the snapshot with one reference assignment, so no request ever sees
half of a change (the old live model with the new candidate, say).

- shadow: every request is answered by the live model; the candidate also scores it (behind the answer) and
  only its live quality is recorded.
- canary: a fixed share of users, chosen by a hash of the user id (so the same users every time, in every
  process and replica), is answered by the candidate.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from app.filters import Filters
from app.model import Prediction, ServingModel

Mode = Literal["shadow", "canary"]
Role = Literal["live", "candidate"]
PredictRequest = tuple[ServingModel, list[str], int, Filters | None]  # (model, window actions, k, filters)


def bucket(user_id: str) -> float:
    """The user's place in [0, 1): a stable hash of the id (the same in every process and release)."""
    digest = hashlib.blake2b(user_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def in_canary(user_id: str, share: float) -> bool:
    return bucket(user_id) < share


@dataclass(frozen=True, slots=True)
class Candidate:
    model: ServingModel
    mode: Mode
    share: float  # canary: the share of users it answers


@dataclass(frozen=True, slots=True)
class Served:
    """The models being served, as one value."""

    live: ServingModel
    candidate: Candidate | None = None

    def for_user(self, user_id: str) -> tuple[ServingModel, Role]:
        """The model that answers this user, and its role."""
        c = self.candidate
        if c is not None and c.mode == "canary" and in_canary(user_id, c.share):
            return c.model, "candidate"
        return self.live, "live"

    @property
    def shadow(self) -> ServingModel | None:
        """The candidate when it scores every request without answering."""
        c = self.candidate
        return c.model if c is not None and c.mode == "shadow" else None

    def by_version(self, version: str) -> ServingModel | None:
        if self.live.version == version:
            return self.live
        if self.candidate is not None and self.candidate.model.version == version:
            return self.candidate.model
        return None

    @property
    def window(self) -> int:
        """The longest window any served model looks back on."""
        return max(self.live.manifest.window, self.candidate.model.manifest.window if self.candidate else 0)


class NoCandidate(Exception):
    """Promote (or a candidate reload) without a candidate."""


class Models:
    """The served snapshot; every change is one assignment of a new Served."""

    def __init__(self, live: ServingModel) -> None:
        self.served = Served(live)

    @property
    def current(self) -> ServingModel:
        """The live model."""
        return self.served.live

    def install(self, model: ServingModel) -> None:
        """A new live model (reload); the candidate stays."""
        self.served = Served(model, self.served.candidate)

    def set_candidate(self, model: ServingModel, mode: Mode, share: float) -> None:
        self.served = Served(self.served.live, Candidate(model, mode, share))

    def drop_candidate(self) -> None:
        self.served = Served(self.served.live)

    def promote(self) -> Served:
        """Make the candidate the live model (and drop the old one); returns the snapshot it replaced."""
        old = self.served
        if old.candidate is None:
            raise NoCandidate("there is no candidate model to promote (NEXTACT_CANDIDATE_ARTIFACT_DIR)")
        self.served = Served(old.candidate.model)
        return old


def predict_mixed(batch: Sequence[PredictRequest]) -> list[Prediction]:
    """One micro-batch whose requests may name different models: one session run per model, results in order."""
    first = batch[0][0]
    if all(r[0] is first for r in batch):
        return first.predict([(a, k, f) for _, a, k, f in batch])
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(batch):
        groups.setdefault(id(r[0]), []).append(i)
    out: list[Prediction | None] = [None] * len(batch)
    for index in groups.values():
        model = batch[index[0]][0]
        for i, p in zip(index, model.predict([batch[i][1:] for i in index]), strict=True):
            out[i] = p
    return [p for p in out if p is not None]
