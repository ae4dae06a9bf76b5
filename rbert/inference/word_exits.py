"""One sentence's words through token-level early exit, without torch.

The batch-size-1 paths of both runtimes walk a sentence the same way: the PyTorch engine's
lean path (:meth:`rbert.inference.tokee.TokenEarlyExit._run_one`) and onnxruntime's per-layer
graphs (:mod:`rbert.deploy.onnx_runtime`). This is that walk, kept in one place so that the
two cannot drift apart: after each consulted exit the live words' normalised entropies go in,
the rule (:class:`~rbert.inference.token_policies.WindowEntropyExit`) says which leave, and
the columns still to compute come out. Special tokens ([CLS], [SEP]) run while any word does.
"""

from __future__ import annotations

import numpy as np

from rbert.inference.policies import entropy
from rbert.inference.token_policies import WindowEntropyExit


def normalised_entropy(logits: np.ndarray) -> np.ndarray:
    """Entropy of each row's softmax over log(number of classes), in [0, 1]."""
    return entropy(logits) / np.log(logits.shape[-1])


class WordExits:
    """``owner``: per token of one unpadded row, the column of its word's first piece (-1: a
    special token), as :func:`rbert.inference.tokee.first_piece_owner` gives it."""

    def __init__(self, owner: np.ndarray, rule: WindowEntropyExit):
        length = len(owner)
        self.first_col = np.flatnonzero(owner == np.arange(length))  # word slot -> its first piece's column
        slot = np.full(length, -1)
        slot[self.first_col] = np.arange(len(self.first_col))
        self.word_of = np.where(owner >= 0, slot[owner.clip(0)], -1)  # token -> word slot (-1: special)
        self.rule = rule
        # each word's latest normalised entropy (the one it left with, once it has left)
        self.entropy = np.full((1, len(self.first_col)), np.nan)
        self.present = np.ones_like(self.entropy, dtype=bool)
        self.done = np.zeros(len(self.first_col), dtype=bool)
        self.running = np.ones(length, dtype=bool)  # the tokens the next layer computes

    def live(self) -> np.ndarray:
        """The word slots still running (their first pieces: ``first_col[live]``)."""
        return np.flatnonzero(~self.done)

    def leave(self, live: np.ndarray, entropy: np.ndarray, index: int, last: bool) -> np.ndarray:
        """After the ``index``-th consulted exit (``last``: the final one, where every word
        leaves): record the ``live`` words' entropies; which of them leave (a mask over ``live``)."""
        self.entropy[0, live] = entropy
        every = np.ones(len(live), dtype=bool)
        leave = every if last else self.rule.decide(self.entropy, self.present, index)[0][live]
        self.done[live[leave]] = True
        self.running = (self.word_of < 0) | ~self.done[self.word_of.clip(0)]
        return leave

    @property
    def finished(self) -> bool:
        return bool(self.done.all())
