"""Exit policies: after each exit, which samples may leave?

A policy is a small object with two methods for a batch:

* ``start(batch_size, device)`` returns its per-sample state (or None);
* ``decide(logits, layer, state) -> (exit_now, state)`` gets one exit's logits (and its
  layer number) for the samples still running and says, per sample, whether to leave here.

The engine calls ``decide`` once per exit, in layer order, and takes ``state[keep]``
itself when samples leave (:func:`take_rows`), so a state is an array (or tuple of arrays)
indexed by sample. The last exit always answers whatever the policy says. Policies know
nothing of models.

The batched rules are NumPy, on float32 or float64 logits: the ONNX runtime runs them as they
are (so serving needs neither torch nor transformers), and the PyTorch engine hands them its
exit logits as a NumPy array (a view on CPU; on a GPU a copy of a few floats a sample, where
the engine had to wait for the answer to drop rows anyway). One rule, one source, whichever
runtime asks.

And two for one sample, ``start_one()`` and ``decide_one(logits, layer, state)`` with the
logits as a list of Python floats. At batch size 1 on a CPU, the half-dozen tensor
operations of ``decide`` run on caches a layer has just flushed, and the same rule on two
or three floats in Python is ~20 us sooner per exit (~3% of a MiniLM layer). The built-in
policies therefore state their rule twice, in float64 both times, and the tests check
that the two agree; a policy that only has ``decide`` still works at batch size 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from rbert.errors import ConfigError


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities of each row, in float64, shifted by the row's maximum for stability."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def entropy(logits: np.ndarray) -> np.ndarray:
    """Prediction entropy in nats of each row (float64)."""
    logp = log_softmax(logits)
    return -(np.exp(logp) * logp).sum(axis=-1)


def take_rows(state, keep: np.ndarray):
    """A policy's state for the samples still running (``keep``: a boolean mask)."""
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(take_rows(s, keep) for s in state)
    return state[keep]


def entropy_one(logits: list[float]) -> float:
    """:func:`entropy` of one sample's logits, in plain Python (float64)."""
    if len(logits) == 2:  # the binary entropy of the margin m: fewer steps on a cold cache
        m = abs(logits[0] - logits[1])
        e = math.exp(-m)
        return math.log1p(e) + m * e / (1.0 + e)
    top = max(logits)
    shifted = [z - top for z in logits]
    weights = [math.exp(z) for z in shifted]
    total = sum(weights)  # H = -sum p (z - top - ln total) = ln total - sum w (z - top) / total
    return math.log(total) - sum(w * z for w, z in zip(weights, shifted)) / total


class ExitPolicy:
    """Base class. ``sweep`` lists the thresholds ``mode=eval`` tries (None: not sweepable)."""

    name = "policy"
    needs_exits = True  # False: runs on a single-exit model
    regression_ok = True
    sweep: Sequence[float] | None = None

    def start(self, batch_size: int):
        return None

    def decide(self, logits: np.ndarray, layer: int, state) -> tuple[np.ndarray, object]:
        """(bool array (batch,): leave here, the new state) from this exit's (batch, labels) logits."""
        raise NotImplementedError

    def start_one(self):
        return self.start(1)

    def decide_one(self, logits: list[float], layer: int, state):
        """One sample's decision from its logits as floats. This fallback runs ``decide`` on
        a batch of one; the built-in policies compute the same rule in plain Python."""
        leave, state = self.decide(np.array([logits]), layer, state)
        return bool(leave[0]), state

    def decide_words(self, logits: np.ndarray, words: np.ndarray, layer: int, state) -> tuple[np.ndarray, object]:
        """Sentence-level early exit for tagging (SENTEE): (batch,) leave flags from one exit's
        token logits ``(batch, tokens, tags)``; ``words`` ``(batch, tokens)`` marks the words
        (their first pieces). A sentence leaves when the rule trusts *every* one of its words:
        for entropy, its largest word entropy is under the threshold; for confidence, its least
        confident word reaches it. Stateless rules only; :class:`PatienceExit` has its own.
        """
        rows, cols = np.nonzero(words)
        trusted, _ = self.decide(logits[rows, cols], layer, None)
        leave = np.ones(words.shape[0], dtype=bool)
        np.logical_and.at(leave, rows, trusted)
        return leave, state

    def with_threshold(self, value: float) -> ExitPolicy:
        """The same policy with another threshold (for sweeps)."""
        raise ConfigError(f"exit_policy={self.name} has no threshold to sweep")

    def check(self, num_labels: int, num_exits: int) -> None:
        """Fail clearly if the policy cannot run on a model with ``num_exits`` trained exits."""
        if self.needs_exits and num_exits < 2:
            raise ConfigError(f"exit_policy={self.name} needs a multi-exit model with trained internal exits; "
                              "the only trained exit of this checkpoint is its final one")
        if num_labels == 1 and not self.regression_ok:
            raise ConfigError(f"exit_policy={self.name} needs class probabilities; the task is a regression")

    def describe(self) -> str:
        return self.name


class NoExit(ExitPolicy):
    """Every sample runs to the last layer."""

    name = "none"
    needs_exits = False

    def decide(self, logits, layer, state):
        return np.zeros(logits.shape[0], dtype=bool), state

    def decide_one(self, logits, layer, state):
        return False, state


class FixedExit(ExitPolicy):
    """Every sample leaves at layer ``layer`` (or the first exit at or after it)."""

    name = "fixed"

    def __init__(self, layer: int, sweep: Sequence[float] | None = None):
        if layer < 1:
            raise ConfigError(f"exit_policy.layer must be >= 1, got {layer}")
        self.layer = int(layer)
        self.sweep = sweep

    def decide(self, logits, layer, state):
        return np.full(logits.shape[0], layer >= self.layer, dtype=bool), state

    def decide_one(self, logits, layer, state):
        return layer >= self.layer, state

    def with_threshold(self, value: float) -> FixedExit:
        return FixedExit(int(value), self.sweep)

    def describe(self) -> str:
        return f"fixed(layer={self.layer})"


class EntropyExit(ExitPolicy):
    """Leave at the first exit whose prediction entropy is below ``threshold`` (DeeBERT, RomeBERT).

    ``normalized=true`` reads the threshold as a fraction of the largest entropy ln(C), so
    one value means the same on every task; a raw threshold must stay below ln(C), else
    every sample would leave at the first exit.
    """

    name = "entropy"
    regression_ok = False

    def __init__(self, threshold: float, normalized: bool = True, sweep: Sequence[float] | None = None):
        self.threshold = float(threshold)
        self.normalized = normalized
        self.sweep = sweep
        if normalized and not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"exit_policy.threshold: a normalised entropy threshold lies in [0, 1], got {threshold}")
        if not normalized and self.threshold < 0:
            raise ConfigError(f"exit_policy.threshold must be >= 0, got {threshold}")

    def check(self, num_labels, num_exits):
        super().check(num_labels, num_exits)
        if not self.normalized and self.threshold >= math.log(num_labels):
            raise ConfigError(f"exit_policy.threshold={self.threshold} >= ln({num_labels}) = "
                              f"{math.log(num_labels):.3f}: every sample would leave at the first exit")

    def limit(self, num_labels: int) -> float:
        return self.threshold * math.log(num_labels) if self.normalized else self.threshold

    def decide(self, logits, layer, state):
        return entropy(logits) < self.limit(logits.shape[-1]), state

    def decide_one(self, logits, layer, state):
        return entropy_one(logits) < self.limit(len(logits)), state

    def with_threshold(self, value):
        return EntropyExit(value, self.normalized, self.sweep)

    def describe(self):
        return f"entropy({'normalised ' if self.normalized else ''}threshold={self.threshold:g})"


class ConfidenceExit(ExitPolicy):
    """Leave once the top class probability reaches ``threshold``."""

    name = "confidence"
    regression_ok = False

    def __init__(self, threshold: float, sweep: Sequence[float] | None = None):
        if not 0.0 < threshold <= 1.0:
            raise ConfigError(f"exit_policy.threshold: a confidence threshold lies in (0, 1], got {threshold}")
        self.threshold = float(threshold)
        self.sweep = sweep

    def decide(self, logits, layer, state):
        return np.exp(log_softmax(logits).max(axis=-1)) >= self.threshold, state

    def decide_one(self, logits, layer, state):
        if len(logits) == 2:  # the top probability is the sigmoid of the margin
            return 1.0 / (1.0 + math.exp(-abs(logits[0] - logits[1]))) >= self.threshold, state
        top = max(logits)  # the top class's probability is exp(0) / sum(exp(z - top))
        return 1.0 / sum(math.exp(z - top) for z in logits) >= self.threshold, state

    def with_threshold(self, value):
        return ConfidenceExit(value, self.sweep)

    def describe(self):
        return f"confidence(threshold={self.threshold:g})"


class PatienceExit(ExitPolicy):
    """Leave once the prediction stayed the same for ``patience`` consecutive exits (PABEE).

    For regression, "the same" means within ``tolerance`` of the previous exit's value.
    """

    name = "patience"

    def __init__(self, patience: int, tolerance: float = 0.1, sweep: Sequence[float] | None = None):
        if patience < 1:
            raise ConfigError(f"exit_policy.patience must be >= 1, got {patience}")
        self.patience = int(patience)
        self.tolerance = float(tolerance)
        self.sweep = sweep

    def start(self, batch_size):
        # (previous prediction, how many exits in a row agreed with it); NaN: no exit seen yet
        return np.full(batch_size, np.nan), np.zeros(batch_size, dtype=np.int64)

    def decide(self, logits, layer, state):
        previous, count = state
        if logits.shape[-1] == 1:
            prediction = logits[:, 0].astype(np.float64)
            same = np.abs(prediction - previous) < self.tolerance
        else:
            prediction = logits.argmax(axis=-1).astype(np.float64)  # the first of ties, as decide_one
            same = prediction == previous
        count = np.where(same, count + 1, 0)
        return count >= self.patience, (prediction, count)

    def start_one(self):
        return math.nan, 0

    def decide_words(self, logits, words, layer, state):
        """SENTEE: a sentence's whole tag sequence unchanged for ``patience`` exits in a row. The
        state's first array holds each sentence's previous tags (-1 off the words); the engine
        may cut trailing padding between exits, which only ever holds no words."""
        previous, count = state
        prediction = np.where(words, logits.argmax(axis=-1), -1)
        if previous.ndim == 1:  # no exit seen yet
            same = np.zeros(len(prediction), dtype=bool)
        else:
            same = (previous[:, :prediction.shape[1]] == prediction).all(axis=1)
        count = np.where(same, count + 1, 0)
        return count >= self.patience, (prediction, count)

    def decide_one(self, logits, layer, state):
        previous, count = state
        if len(logits) == 1:
            prediction = logits[0]
            same = abs(prediction - previous) < self.tolerance
        else:
            prediction = max(range(len(logits)), key=logits.__getitem__)  # the first of ties, as argmax
            same = prediction == previous
        count = count + 1 if same else 0
        return count >= self.patience, (prediction, count)

    def with_threshold(self, value):
        return PatienceExit(int(value), self.tolerance, self.sweep)

    def describe(self):
        return f"patience({self.patience})"


POLICIES = {cls.name: cls for cls in (NoExit, FixedExit, EntropyExit, ConfidenceExit, PatienceExit)}


class BudgetExit(ExitPolicy):
    """Choose the threshold of a ``base`` policy on the dev set to meet a target.

    Give ``speedup`` (layer-count speed-up to reach, e.g. 2.0: the smallest metric drop
    that reaches it) or ``max_drop`` (metric points one may lose, e.g. 1.0: the largest
    speed-up within it). ``mode=eval`` reports what the chosen threshold reached.
    """

    name = "budget"

    def __init__(self, base: ExitPolicy, speedup: float | None = None, max_drop: float | None = None):
        if (speedup is None) == (max_drop is None):
            raise ConfigError("exit_policy: budget needs exactly one of speedup or max_drop")
        if base.sweep is None:
            raise ConfigError(f"exit_policy.base: {base.name} has no thresholds to choose from")
        self.base, self.speedup, self.max_drop = base, speedup, max_drop
        self.sweep = base.sweep

    def check(self, num_labels, num_exits):
        self.base.check(num_labels, num_exits)

    def decide(self, logits, layer, state):
        raise RuntimeError("a budget policy must choose its threshold first (BudgetExit.choose)")

    decide_one = decide

    def choose(self, rows: list[dict], as_policy: bool = False):
        """The sweep row (``threshold``, ``layer_speedup``, ``drop``) that meets the target best."""
        if self.max_drop is not None:
            ok = [r for r in rows if r["drop"] <= self.max_drop]
            best = max(ok, key=lambda r: r["layer_speedup"]) if ok else min(rows, key=lambda r: r["drop"])
        else:
            ok = [r for r in rows if r["layer_speedup"] >= self.speedup]
            best = min(ok, key=lambda r: r["drop"]) if ok else max(rows, key=lambda r: r["layer_speedup"])
        if as_policy:
            if not ok:
                raise ConfigError(f"exit_policy: no {self.base.name} threshold in the sweep meets {self.describe()}")
            return self.base.with_threshold(best["threshold"])
        return {"target": self.describe(), "met": bool(ok), "threshold": best["threshold"],
                "layer_speedup": best["layer_speedup"], "drop": best["drop"]}

    def describe(self):
        target = f"speedup>={self.speedup:g}" if self.speedup is not None else f"drop<={self.max_drop:g}"
        return f"budget({self.base.name}, {target})"


POLICIES["budget"] = BudgetExit


def policy_to_dict(policy: ExitPolicy) -> dict:
    """A policy as plain data (``{"name": "entropy", "threshold": 0.3, "normalized": true}``) for
    an exported folder's config.json: its constructor arguments, without the sweep."""
    if isinstance(policy, BudgetExit):
        raise ValueError("a budget policy is stored as the policy it chose (BudgetExit.choose(..., as_policy=True))")
    if hasattr(policy, "to_dict"):  # token-level exit (rbert.inference.token_policies)
        return policy.to_dict()
    return {"name": policy.name, **{k: v for k, v in vars(policy).items() if k != "sweep"}}


def policy_from_dict(data: dict) -> ExitPolicy:
    """The policy :func:`policy_to_dict` wrote. Only the built-in policies by name (a file's
    content is data: nothing is imported or instantiated from it)."""
    data = dict(data)
    name = data.pop("name", None)
    if name not in POLICIES or name == "budget":
        raise ValueError(f"policy name {name!r} is not one of {[n for n in POLICIES if n != 'budget']}")
    try:
        return POLICIES[name](**data)
    except TypeError as err:
        raise ValueError(f"policy {name}: {err}") from err
