"""Self-sampling fine-tuning for token-level early exit (Li et al., ACL 2021).

At inference a word that left keeps its hidden state, and the words still running attend to
that copied state; a model trained with every word running every layer never saw such
states. Self-sampling shows them in training: for each sentence of a batch, a window and a
threshold are drawn from the settings, the exit layer of each word is simulated from the
model's own current predictions (one pass without gradients, the rule of
:class:`~rbert.inference.token_policies.WindowEntropyExit`), and the training pass runs with
those words halted and copied (``MultiExitTokenBert.forward(halt_after=...)``); the
objective's loss is then taken on every exit as usual. ``sandwich`` sentences of each batch
keep the full pattern (no word halted), as the reference's ``sandwich_full``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from rbert.errors import ConfigError
from rbert.inference.tokee import first_piece_owner
from rbert.inference.token_policies import WindowEntropyExit
from rbert.inference.words import IGNORE


class SelfSampling:
    def __init__(self, windows: Sequence[int] = (1, 2, 3, 4, 5, 6, 7), thresholds: Sequence[float] = (
            0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5), sandwich: int = 2, seed: int = 0):
        if not windows or not thresholds or min(windows) < 0 or not all(0 <= t <= 1 for t in thresholds):
            raise ConfigError(f"model.self_sampling: windows >= 0 and thresholds in [0, 1], got {windows}, "
                              f"{thresholds}")
        self.windows, self.thresholds, self.sandwich = list(windows), list(thresholds), int(sandwich)
        self.rng = np.random.default_rng(seed)

    @torch.no_grad()
    def halt_after(self, net, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(batch, tokens)``: the layer after which each token halts (the last layer: never)."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        was_training = net.training
        net.eval()
        logits = net(ids, mask, batch.get("token_type_ids"))
        net.train(was_training)
        last = net.exit_layers[-1]
        words = batch["labels"] != IGNORE
        lengths = mask.sum(dim=1)
        cols = torch.arange(ids.shape[1], device=ids.device)
        owner = first_piece_owner(words, mask.bool() & (cols > 0) & (cols < (lengths - 1)[:, None]))
        logp = [torch.log_softmax(z.float(), -1) for z in logits]
        entropy = torch.stack([-(p.exp() * p).sum(-1) for p in logp]).cpu().numpy() / np.log(logits[0].shape[-1])
        words_np = words.cpu().numpy()
        halt = torch.full(ids.shape, last, dtype=torch.long, device=ids.device)
        for row in range(ids.shape[0]):
            if row < self.sandwich:
                continue
            positions = np.flatnonzero(words_np[row])
            if len(positions) == 0:
                continue
            rule = WindowEntropyExit(float(self.rng.choice(self.thresholds)), int(self.rng.choice(self.windows)))
            exit_at = np.full(len(positions), last)
            done = np.zeros(len(positions), dtype=bool)
            frozen = np.full(len(positions), np.nan)
            for i, layer in enumerate(net.exit_layers[:-1]):
                current = np.where(done, frozen, entropy[i, row, positions])
                leave = rule.decide(current[None], np.ones((1, len(positions)), dtype=bool), i)[0] & ~done
                exit_at[leave], frozen[leave], done = layer, current[leave], done | leave
            word_halt = torch.full((ids.shape[1],), last, dtype=torch.long, device=ids.device)
            word_halt[torch.from_numpy(positions).to(ids.device)] = torch.from_numpy(exit_at).to(ids.device)
            pieces = owner[row] >= 0
            halt[row, pieces] = word_halt[owner[row, pieces]]
            halt[row, ~pieces] = int(exit_at.max())  # specials run while any word of the row does
        return halt
