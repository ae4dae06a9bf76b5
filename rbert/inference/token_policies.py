"""Token-level exit rules (TOKEE): which *words* leave after an exit.

Li et al. (ACL 2021) let a word leave at layer l when the largest normalised entropy of the
predictions in a window of its neighbours (+-``window`` words, itself included) is under
that layer's threshold: a word does not leave while a neighbour it may depend on is still
unsure. A word that left keeps the entropy it left with (its prediction is final), so it
never holds a neighbour back. Thresholds: one for every layer, or a list with one per
consulted exit but the last (the reference's ``test.py`` sweeps per-layer lists, windows
5-15, thresholds 0.1-0.25).

Small and pure: NumPy in, NumPy out, nothing about models; the engine
(:mod:`rbert.inference.tokee`) passes word-level arrays ``(rows, words)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rbert.errors import ConfigError


class WindowEntropyExit:
    name = "window_entropy"

    def __init__(self, threshold: float | Sequence[float], window: int = 2):
        values = [float(threshold)] if np.isscalar(threshold) else [float(t) for t in threshold]
        if not values or not all(0.0 <= t <= 1.0 for t in values):
            raise ConfigError(f"exit_policy.threshold: normalised entropy thresholds lie in [0, 1], got {threshold}")
        if window < 0:
            raise ConfigError(f"exit_policy.window must be >= 0 words, got {window}")
        self.thresholds, self.window = values, int(window)

    def threshold(self, index: int) -> float:
        """The threshold of the ``index``-th consulted exit (0-based); a single value serves all."""
        return self.thresholds[min(index, len(self.thresholds) - 1)]

    def decide(self, entropy: np.ndarray, present: np.ndarray, index: int) -> np.ndarray:
        """``entropy`` ``(rows, words)``: each word's normalised entropy now (or when it left);
        ``present``: the real words (not padding). Which words' windows are all under the
        ``index``-th exit's threshold."""
        k = self.window
        scores = np.where(present, entropy, -np.inf)
        padded = np.pad(scores, ((0, 0), (k, k)), constant_values=-np.inf)
        windows = np.lib.stride_tricks.sliding_window_view(padded, 2 * k + 1, axis=1)
        return (windows.max(axis=-1) < self.threshold(index)) & present

    def check(self, num_labels: int, num_exits: int) -> None:
        if num_exits < 2:
            raise ConfigError(f"exit_policy={self.name} needs a multi-exit tagger with trained internal exits")

    def to_dict(self) -> dict:
        return {"name": self.name, "threshold": self.thresholds if len(self.thresholds) > 1 else self.thresholds[0],
                "window": self.window}

    def describe(self) -> str:
        t = self.thresholds[0] if len(self.thresholds) == 1 else self.thresholds
        return f"window_entropy(threshold={t}, window={self.window})"
