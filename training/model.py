"""The network: action ids (B, T) -> embedding -> LSTM/GRU -> (feed-forward block) -> scores over the vocabulary.

`forward` is exactly what model.onnx computes: the probabilities of the next action after each row's
`lengths` events, with the padding and unknown ids masked out. Training reads `position_states` instead:
the states at every real position of a right-padded batch, which the losses (training/losses.py) score.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from app.manifest import PAD_ID, UNK_ID
from training.config import ModelConfig


class FeedForward(nn.Module):
    """LayerNorm on the recurrent output, then a residual two-layer feed-forward block and a second LayerNorm."""

    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.norm_in = nn.LayerNorm(dim)
        self.ff = nn.Sequential(
            nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim)
        )
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.norm_in(h)  # (..., H)
        return self.norm_out(h + self.ff(h))  # (..., H)


class PrefixHistory:
    """Which actions each scored position of a right-padded batch has seen (its row's events up to it),
    from each row's first position of every action: (B, V) instead of (N, V) one-hots."""

    def __init__(self, action_ids: torch.Tensor, keep: torch.Tensor, vocab_size: int) -> None:
        b, t = action_ids.shape
        steps = torch.arange(t, device=action_ids.device).expand(b, t)  # (B, T)
        first = torch.full((b, vocab_size), t, dtype=torch.long, device=action_ids.device)  # (B, V)
        self.first = first.scatter_reduce(1, action_ids, steps, reduce="amin")  # (B, V); PAD's is meaningless
        self.rows, self.cols = keep.nonzero(as_tuple=True)  # (N,), (N,): the scored positions

    def seen(self, columns: torch.Tensor | None = None) -> torch.Tensor:
        """1.0 where the position has seen the action, else 0.0: over every action (N, V), or over the
        candidate ids `columns` (N, C)."""
        first = self.first[self.rows] if columns is None else self.first[self.rows.unsqueeze(1), columns]
        return (first <= self.cols.unsqueeze(1)).float()  # (N, V) or (N, C)


class NextActionModel(nn.Module):
    """Embedding, a recurrent layer (LSTM or GRU), dropout and a linear layer over the vocabulary."""

    masked: torch.Tensor  # (V,) bool buffer: PAD and UNK

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.embedding_dim, padding_idx=PAD_ID)
        rnn = nn.LSTM if config.cell == "lstm" else nn.GRU
        self.rnn = rnn(
            config.embedding_dim,
            config.hidden_dim,
            num_layers=config.num_layers,
            batch_first=True,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
        )
        input_dropout = config.dropout if config.input_dropout is None else config.input_dropout
        self.input_dropout = nn.Dropout(input_dropout)
        self.dropout = nn.Dropout(config.dropout)
        # The last event decides much of what comes next (item-to-item transitions); a residual path from its
        # embedding keeps its identity sharp in the state the head reads, instead of only through the gates.
        self.skip = (
            nn.Linear(config.embedding_dim, config.hidden_dim, bias=False) if config.residual else None
        )
        self.block = FeedForward(config.hidden_dim, config.dropout) if config.feed_forward else None
        if config.tied:
            self.project: nn.Module = nn.Linear(config.hidden_dim, config.embedding_dim)
            self.head = nn.Linear(config.embedding_dim, config.vocab_size)  # its bias: one per action
            self.head.weight = self.embedding.weight  # one table for inputs and outputs
        else:
            self.project = nn.Identity()
            self.head = nn.Linear(config.hidden_dim, config.vocab_size)
        # One learned number added to the score of every action already in the window: data where actions
        # repeat (page views) learn it positive, data where they never do (one review per item) negative.
        self.history_bias = nn.Parameter(torch.zeros(1)) if config.history_bias else None
        # Side information: one more table over side values, added to every action's input embedding and,
        # untied, a second one (zeros at first) to its output row. Each action starts near its side value's
        # vector: that table at nn.Embedding's scale, the action's own at side_own_scale of it, so an action
        # seen once starts as its category and moves only as far as its own events take it (chosen on the
        # Taobao sample's validation split, docs/model-quality.md "Side information").
        self.side: nn.Embedding | None = None
        self.side_out: nn.Embedding | None = None
        if config.side_of is not None:
            side_of = torch.tensor(config.side_of, dtype=torch.long)  # (V,)
            if side_of.shape != (config.vocab_size,) or int(side_of.min()) < 0:
                raise ValueError("side_of must hold one side value >= 0 per action")
            n_side = int(side_of.max()) + 1
            self.side = nn.Embedding(n_side, config.embedding_dim, padding_idx=0)  # N(0, 1), row 0 zero
            with torch.no_grad():
                self.embedding.weight.mul_(config.side_own_scale)
            if not config.tied:
                self.side_out = nn.Embedding(n_side, self.head.in_features, padding_idx=0)
                nn.init.zeros_(self.side_out.weight)
            self.register_buffer("side_of", side_of)
        masked = torch.zeros(config.vocab_size, dtype=torch.bool)
        masked[[PAD_ID, UNK_ID]] = True  # never predicted: probability exactly 0
        self.register_buffer("masked", masked, persistent=False)

    def embed(self, action_ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings (..., E) of action ids (...): the action's own plus its side value's."""
        x = self.embedding(action_ids)  # (..., E)
        if self.side is not None:
            x = x + self.side(self.side_of[action_ids])  # (..., E)
        return x

    def output_rows(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """The output layer's weight rows (M, D) of action ids (M,), or of every action (V, D) for None."""
        weight = self.head.weight if ids is None else self.head.weight[ids]  # (M, D)
        side = self.side if self.config.tied else self.side_out
        if side is not None:
            side_ids = self.side_of if ids is None else self.side_of[ids]  # (M,)
            weight = weight + side(side_ids)  # (M, D)
        return weight

    def head_input(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """What the head reads from recurrent outputs (..., H) and the embeddings they came from (..., E);
        the step graph calls it too, so both graphs compute the same thing."""
        if self.skip is not None:
            out = out + self.skip(x)  # (..., H)
        if self.block is not None:
            out = self.block(out)  # (..., H)
        return out

    def states(self, action_ids: torch.Tensor) -> torch.Tensor:
        """Hidden state after every position of right-padded ids (B, T) -> (B, T, H).

        With right padding the state at position t depends only on events 0..t, so padding never
        leaks into the states that are read.
        """
        x = self.input_dropout(self.embed(action_ids))  # (B, T, E)
        out, _ = self.rnn(x)  # (B, T, H)
        return self.dropout(self.head_input(out, x))  # (B, T, H)

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        """Scores over the vocabulary from hidden states (..., H) -> (..., V), PAD and UNK at -inf."""
        bias = self.head.bias.masked_fill(self.masked, float("-inf"))  # (V,): cheaper than masking (N, V)
        return F.linear(self.project(states), self.output_rows(), bias)  # (..., V)

    def _add_history(self, logits: torch.Tensor, ids: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        """logits (N, V) + history_bias where the action occurs among ids (N, T) at positions `seen` (N, T)."""
        if self.history_bias is None:
            return logits
        onehot = torch.zeros_like(logits).scatter(1, ids * seen, seen.to(logits.dtype))  # (N, V)
        return logits + self.history_bias * onehot  # (N, V); PAD stays -inf

    def position_states(
        self, action_ids: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, PrefixHistory | None]:
        """Training: states (N, H) and targets (N,) at every position whose target is a known action (padding
        is never scored), and, with a history bias, which actions each of those positions has seen."""
        states = self.states(action_ids)  # (B, T, H)
        keep = targets > UNK_ID  # (B, T): not padding, not unknown
        history = (
            PrefixHistory(action_ids, keep, self.config.vocab_size) if self.history_bias is not None else None
        )
        return states[keep], targets[keep], history  # (N, H), (N,)

    def position_logits(
        self, action_ids: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training with full softmax: logits (N, V) and targets (N,) at every position whose target is known."""
        states, kept, history = self.position_states(action_ids, targets)  # (N, H), (N,)
        logits = self.logits(states)  # (N, V)
        if history is not None and self.history_bias is not None:
            logits = logits + self.history_bias * history.seen()  # (N, V)
        return logits, kept

    def final_logits(self, action_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) after the first `lengths` events of right-padded ids (B, T); PAD and UNK at -inf.

        A row of length 0 reads a zero state: the model's prediction for a user without history.
        Lengths beyond T read the last position.
        """
        states = self.states(action_ids)  # (B, T, H)
        last = (lengths - 1).clamp(min=0).clamp(max=action_ids.shape[1] - 1)  # (B,)
        index = last.view(-1, 1, 1).expand(-1, 1, states.shape[2])  # (B, 1, H)
        final = states.gather(1, index).squeeze(1)  # (B, H)
        final = torch.where((lengths > 0).unsqueeze(1), final, torch.zeros_like(final))  # (B, H)
        steps = torch.arange(action_ids.shape[1], device=action_ids.device)  # (T,)
        seen = steps.unsqueeze(0) < lengths.unsqueeze(1)  # (B, T): real events, not padding
        return self._add_history(self.logits(final), action_ids, seen)  # (B, V)

    def forward(self, action_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Next-action probabilities (B, V): the exported graph. action_ids (B, T) right-padded, lengths (B,)."""
        return torch.softmax(self.final_logits(action_ids, lengths), dim=-1)  # (B, V)
