"""Words, word pieces and tags: what sequence labelling shares between training and serving.

Torch-free (NumPy only): the tagging data module, the evaluation engine and the exported
runtimes all use these, so a sentence is cut, aligned and decoded the same way everywhere.

* **First pieces.** A word's tag is predicted on its first word piece; the other pieces
  carry no label (``IGNORE``) and are left out of the loss and the metric, the convention
  of ``transformers``' token-classification examples.
* **Windows.** A sentence whose pieces do not fit ``max_length`` is cut into overlapping
  windows of whole words; each word is *owned* by the window where it sits furthest from an
  edge (the most context on both sides), and its answer is taken from that window. Nothing
  is truncated.
* **BIO decoding.** For BIO tags the decoder keeps sequences valid: ``I-x`` only after
  ``B-x`` or ``I-x``. It is the reference code's constraint matrix with Viterbi over the
  exit's log-probabilities (no learned transitions): the best *valid* sequence, which equals
  the arg-max wherever the arg-max is valid.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

IGNORE = -100  # a label the loss and the metrics skip (non-first pieces, specials, words owned elsewhere)


@dataclass
class Window:
    """Words ``start .. stop - 1`` of a sentence, as the pieces between the special tokens.

    ``pieces``: the word-piece ids; ``first``: for each word of the window, the index of its
    first piece in ``pieces``; ``owned``: for each word, whether this window answers for it.
    """

    start: int
    stop: int
    pieces: list[int]
    first: list[int]
    owned: list[bool]


def word_windows(word_pieces: list[list[int]], budget: int, unk_id: int) -> list[Window]:
    """Cut a sentence (its words' piece ids) into windows of at most ``budget`` pieces.

    A word that the tokenizer turns into no piece at all (a zero-width character) gets
    ``unk_id``, so that every word has a first piece and an answer. A single word longer
    than the budget keeps its first ``budget`` pieces (its tag sits on the first). Windows
    overlap by about half: each starts at the middle of the previous one.
    """
    if budget < 1:
        raise ValueError(f"budget must be >= 1 piece, got {budget}")
    words = [(pieces or [unk_id])[:budget] for pieces in word_pieces]
    n = len(words)
    spans = []  # (start, stop) in words
    start = 0
    while True:
        stop, used = start, 0
        while stop < n and used + len(words[stop]) <= budget:
            used += len(words[stop])
            stop += 1
        spans.append((start, stop))
        if stop >= n:
            break
        start = max(start + 1, (start + stop) // 2)  # overlap by half, and always move on
    owner = [0] * n
    best = [-1.0] * n
    for k, (a, b) in enumerate(spans):
        for w in range(a, b):
            margin = min(w - a, b - 1 - w)
            if margin > best[w]:
                best[w], owner[w] = margin, k
    windows = []
    for k, (a, b) in enumerate(spans):
        pieces, first = [], []
        for w in range(a, b):
            first.append(len(pieces))
            pieces.extend(words[w])
        windows.append(Window(a, b, pieces, first, [owner[w] == k for w in range(a, b)]))
    return windows


@dataclass
class TagRow:
    """One model input of a tagging request: a window of sentence ``sentence`` with its special
    tokens (``ids``); ``positions``: where the first pieces of the words it answers for sit in
    ``ids``; ``words``: those words' indices in the sentence; ``firsts``: the first pieces of
    every word in the window (owned or not), for token-level exit, where each word runs on
    its own."""

    sentence: int
    window: int
    ids: list[int]
    positions: list[int]
    words: list[int]
    firsts: list[int] = field(default_factory=list)
    stop: int = 0  # where the word pieces end in ids (the special tokens after them start)


def tag_rows(sentences: list[list[list[int]]], max_length: int, before: list[int], after: list[int],
             unk_id: int) -> tuple[list[TagRow], int]:
    """Model inputs for sentences given as their words' piece ids: one row per window (see
    :func:`word_windows`), and how many sentences needed more than one."""
    budget = max_length - len(before) - len(after)
    rows, windowed = [], 0
    for number, word_pieces in enumerate(sentences):
        windows = word_windows(word_pieces, budget, unk_id)
        windowed += len(windows) > 1
        for k, w in enumerate(windows):
            owned = [i for i, own in enumerate(w.owned) if own]
            rows.append(TagRow(number, k, before + w.pieces + after, [len(before) + w.first[i] for i in owned],
                               [w.start + i for i in owned], [len(before) + f for f in w.first],
                               len(before) + len(w.pieces)))
    return rows, windowed


def pad_rows(rows: list[TagRow], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids, attention_mask, words) int64 / bool arrays of a batch of rows, padded on the right;
    ``words`` marks the positions of the words each row answers for."""
    width = max(len(r.ids) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    words = np.zeros((len(rows), width), dtype=bool)
    for i, r in enumerate(rows):
        ids[i, :len(r.ids)] = r.ids
        mask[i, :len(r.ids)] = 1
        words[i, r.positions] = True
    return ids, mask, words


def piece_owners(rows: list[TagRow], width: int) -> np.ndarray:
    """``(rows, width)`` int64: each token's word, as the column of the word's first piece;
    -1 for special tokens and padding (what token-level exit takes)."""
    owner = np.full((len(rows), width), -1, dtype=np.int64)
    for i, r in enumerate(rows):
        for first, end in zip(r.firsts, r.firsts[1:] + [r.stop]):
            owner[i, first:end] = first
    return owner


def stitch(rows: list[TagRow], tags: np.ndarray, exit_layer: np.ndarray, lengths: list[int]
           ) -> list[tuple[list[int], int]]:
    """Per sentence, (tag id of every word, the deepest exit any of its windows left at), from each
    row's ``tags`` ``(rows, tokens)`` and ``exit_layer`` ``(rows,)``."""
    out = [([-1] * n, 0) for n in lengths]
    for row, row_tags, layer in zip(rows, tags, exit_layer.tolist()):
        sentence_tags, deepest = out[row.sentence]
        for position, word in zip(row.positions, row.words):
            sentence_tags[word] = int(row_tags[position])
        out[row.sentence] = (sentence_tags, max(deepest, int(layer)))
    return out


# ---------------------------------------------------------------------------- BIO
def entity_type(tag: str) -> str | None:
    """``B-person`` -> ``person``; ``O`` (or a tag outside the scheme) -> None."""
    return tag[2:] if tag[:2] in ("B-", "I-") else None


def bio_transitions(tags: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(allowed[prev, next], allowed_first[tag]) for BIO tags: ``I-x`` only after ``B-x``/``I-x``."""
    n = len(tags)
    allowed = np.ones((n, n), dtype=bool)
    first = np.ones(n, dtype=bool)
    for j, tag in enumerate(tags):
        if tag.startswith("I-"):
            first[j] = False
            for i, prev in enumerate(tags):
                allowed[i, j] = entity_type(prev) == tag[2:]
    return allowed, first


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def viterbi(logits: np.ndarray, allowed: np.ndarray, first: np.ndarray) -> np.ndarray:
    """The best tag sequence (ids) for one sentence's word logits ``[W, C]`` that keeps every
    transition allowed; scores are summed log-probabilities."""
    scores = log_softmax(logits)
    n_words = scores.shape[0]
    if n_words == 0:
        return np.zeros(0, dtype=np.int64)
    forbid = np.where(allowed, 0.0, -np.inf)
    best = np.where(first, scores[0], -np.inf)
    back = np.zeros(scores.shape, dtype=np.int64)
    for w in range(1, n_words):
        total = best[:, None] + forbid  # [prev, next]
        back[w] = total.argmax(axis=0)
        best = total.max(axis=0) + scores[w]
    path = np.empty(n_words, dtype=np.int64)
    path[-1] = int(best.argmax())
    for w in range(n_words - 1, 0, -1):
        path[w - 1] = back[w, path[w]]
    return path


def decode_rows(logits: np.ndarray, word_mask: np.ndarray, transitions: tuple[np.ndarray, np.ndarray] | None
                ) -> np.ndarray:
    """Tag ids ``[B, T]`` for a batch of piece logits ``[B, T, C]``: arg-max, or (``transitions``
    given) the best valid sequence over the positions where ``word_mask`` is true (the words'
    first pieces). Other positions get ``IGNORE``."""
    out = np.full(word_mask.shape, IGNORE, dtype=np.int64)
    if transitions is None:
        out[word_mask] = logits.argmax(axis=-1)[word_mask]
        return out
    allowed, first = transitions
    for row in range(logits.shape[0]):
        positions = np.flatnonzero(word_mask[row])
        out[row, positions] = viterbi(logits[row, positions], allowed, first)
    return out
