"""What both deployed runtimes share: texts in, tokens, and answers out.

:class:`Predictor` turns texts into the model's inputs exactly as training did (the
folder's tokenizer, truncation at ``max_length``, right padding) and its outputs into
answers: the label, every class's probability and the layer each text left at. For a
tagger, a text is raw text (split into words by the tokenizer's pre-tokenizer) or a list of
words; it becomes one row per window (:mod:`rbert.inference.words`: a long sentence is cut
into overlapping windows, never truncated), and the answer is a tag per word. The
runtimes (:class:`~rbert.deploy.model.EarlyExitModel` in PyTorch,
:class:`~rbert.deploy.onnx_runtime.OnnxEarlyExitModel` on onnxruntime) only provide
:meth:`Predictor.run`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rbert.deploy.folder import DeploySpec, FolderError
from rbert.deploy.tokenizer import FolderTokenizer
from rbert.inference.policies import ExitPolicy, NoExit, policy_from_dict
from rbert.inference.token_policies import WindowEntropyExit
from rbert.inference.words import bio_transitions, decode_rows, pad_rows, piece_owners, stitch, tag_rows

Text = str | Sequence[str]  # one text, or a pair for two-text tasks (MRPC, STS-B, MNLI, ...)


def folder_policy(spec: DeploySpec, policy: ExitPolicy | WindowEntropyExit | dict | None, where: str
                  ) -> ExitPolicy | WindowEntropyExit:
    """The policy to run: ``policy`` if given (an object, or a dict as config.json stores one),
    else the one the folder was exported with. A tagger also takes token-level exit
    (``{"name": "window_entropy", "threshold": ..., "window": ...}``: each word leaves on its own)."""
    if isinstance(policy, (ExitPolicy, WindowEntropyExit)):
        return token_level(spec, policy)
    if policy is not None and not isinstance(policy, dict):
        raise FolderError(f"policy: expected an object such as {{\"name\": \"none\"}}, got {policy!r}")
    data = policy if policy is not None else spec.policy
    if isinstance(data, dict) and data.get("name") == WindowEntropyExit.name:
        try:
            return token_level(spec, WindowEntropyExit(**{k: v for k, v in data.items() if k != "name"}))
        except (TypeError, ValueError) as err:
            raise FolderError(f"{where}: policy {data}: {err}") from err
    try:
        return policy_from_dict(policy if policy is not None else spec.policy)
    except ValueError as err:
        raise FolderError(f"{where}: rbert_early_exit.policy: {err}") from err


def token_level(spec: DeploySpec, policy):
    if isinstance(policy, WindowEntropyExit) and not spec.tagging:
        raise FolderError(f"policy: {policy.describe()} is token-level early exit, for taggers; {spec.task} "
                          "labels whole texts")
    return policy


class Predictor:
    """Base class of the deployed runtimes: tokenising, batching and answers."""

    spec: DeploySpec
    tokenizer: FolderTokenizer
    policy: ExitPolicy

    @property
    def consulted(self) -> list[int]:
        """The exits the policy consults: only the final one when it never leaves early."""
        return self.spec.consulted_exits[-1:] if isinstance(self.policy, NoExit) else self.spec.consulted_exits

    def rows(self, texts: Sequence[Text]) -> list[tuple[str, ...]]:
        """``texts`` as tuples of the task's fields (a tagger's: of words); a ValueError names
        the first bad one."""
        if self.spec.tagging:
            return [tuple(words) for words in self.sentences(texts)]
        n = len(self.spec.text_fields)
        rows = []
        for i, text in enumerate(texts):
            row = (text,) if isinstance(text, str) else tuple(text) if isinstance(text, (list, tuple)) else None
            if row is None or len(row) != n or not all(isinstance(t, str) for t in row):
                want = "a string" if n == 1 else f"a list of {n} strings ({', '.join(self.spec.text_fields)})"
                raise ValueError(f"texts[{i}]: expected {want}, got {type(text).__name__}")
            rows.append(row)
        return rows

    def sentences(self, texts: Sequence[Text]) -> list[list[str]]:
        """A tagger's texts as words: a string is raw text, split by the tokenizer's pre-tokenizer;
        a list is the words themselves."""
        out = []
        for i, text in enumerate(texts):
            if isinstance(text, str):
                words = self.tokenizer.split(text)
            elif isinstance(text, (list, tuple)) and all(isinstance(w, str) for w in text):
                words = list(text)
            else:
                raise ValueError(f"texts[{i}]: expected a string (raw text) or a list of words, "
                                 f"got {type(text).__name__}")
            if not words or any(not w.strip() for w in words):
                raise ValueError(f"texts[{i}]: {'an empty word' if words else 'no words'}")
            out.append(words)
        return out

    def lengths(self, texts: Sequence[Text]) -> list[int]:
        """Each text's length in tokens, untruncated (special tokens included)."""
        return self.tokenizer.lengths(self.rows(texts))

    def encode(self, texts: Sequence[Text]) -> dict[str, np.ndarray]:
        """int64 arrays ``input_ids``, ``token_type_ids``, ``attention_mask``, truncated at
        ``max_length``, padded on the right (the runtimes cut padding on the right)."""
        return self.tokenizer(self.rows(texts), self.spec.max_length)

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray | None = None,
            words: np.ndarray | None = None, owner: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(logits (batch, num_labels) float32, exit layer (batch,) int64) of one batch; a tagger's
        logits are (batch, tokens, num_labels), and ``words`` marks the words' first pieces;
        token-level exit takes each token's word (``owner``) and answers an exit layer per token."""
        raise NotImplementedError

    def answer(self, logits: np.ndarray, exit_layer: np.ndarray) -> list[dict]:
        out = []
        for z, layer in zip(logits.astype(np.float64), exit_layer.tolist()):
            if self.spec.regression:
                out.append({"score": float(z[0]), "exit_layer": int(layer)})
                continue
            p = np.exp(z - z.max())
            p /= p.sum()
            out.append({"label": self.spec.labels[int(p.argmax())],
                        "probabilities": {name: float(v) for name, v in zip(self.spec.labels, p)},
                        "exit_layer": int(layer)})
        return out

    def tag_batches(self, sentences: list[list[str]], batch_size: int) -> tuple[list, list[tuple]]:
        """The rows of ``sentences`` (a sentence's word pieces between the specials; one longer
        than ``max_length`` cut into overlapping windows) and :meth:`run`'s inputs for each
        ``batch_size`` of them: (ids, mask, token types, first pieces, each piece's word; None but
        for token-level exit, the only policy that reads it).
        Apart from :meth:`tag` so that a benchmark times the runtime on the inputs it answers."""
        before, after = self.tokenizer.specials()
        rows, _ = tag_rows(self.tokenizer.word_pieces(sentences), self.spec.max_length, before, after,
                           self.tokenizer.unk_id)
        batches = []
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            ids, mask, words = pad_rows(chunk, self.tokenizer.pad_id)
            owner = piece_owners(chunk, ids.shape[1]) if self.token_level else None
            batches.append((ids, mask, np.zeros_like(ids), words, owner))
        return rows, batches

    def tag(self, texts: Sequence[Text], batch_size: int = 32) -> list[dict]:
        """A tagger's answers: ``{"words", "tags", "exit_layer"}`` per text (the deepest exit of
        its windows), ``batch_size`` rows (windows) a model call."""
        sentences = self.sentences(texts)
        rows, batches = self.tag_batches(sentences, batch_size)
        transitions = bio_transitions(self.spec.labels) if self.spec.scheme == "bio" else None
        width = max(len(r.ids) for r in rows)
        tags = np.zeros((len(rows), width), dtype=np.int64)
        exits = np.zeros(len(rows), dtype=np.int64)
        word_exits = np.zeros((len(rows), width), dtype=np.int64)
        for start, inputs in zip(range(0, len(rows), batch_size), batches):
            logits, layer = self.run(*inputs)
            end, length = start + len(inputs[0]), inputs[0].shape[1]
            tags[start:end, :length] = decode_rows(logits, inputs[3], transitions)
            if self.token_level:  # each word's own exit, kept where the tags are
                word_exits[start:end, :length] = layer
            else:
                exits[start:end] = layer
        answers = []
        lengths = [len(s) for s in sentences]
        stitched = stitch(rows, tags, exits, lengths)
        per_word = stitch(rows, word_exits, exits, lengths) if self.token_level else None
        for i, (words, (tag_ids, layer)) in enumerate(zip(sentences, stitched)):
            answer = {"words": words, "tags": [self.spec.labels[t] for t in tag_ids], "exit_layer": layer}
            if per_word is not None:
                answer["exit_layers"] = per_word[i][0]
                answer["exit_layer"] = max(per_word[i][0])
            answers.append(answer)
        return answers

    @property
    def token_level(self) -> bool:
        """Whether words leave one by one (TOKEE) rather than sentences whole."""
        return isinstance(self.policy, WindowEntropyExit)

    def predict(self, texts: Sequence[Text], batch_size: int = 32) -> list[dict]:
        """Answer every text: ``{"label", "probabilities", "exit_layer"}`` (regression:
        ``{"score", "exit_layer"}``; a tagger: ``{"words", "tags", "exit_layer"}``), in the
        order given, ``batch_size`` texts at a time."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if self.spec.tagging:
            return self.tag(texts, batch_size)
        answers = []
        for start in range(0, len(texts), batch_size):
            enc = self.encode(texts[start:start + batch_size])
            answers += self.answer(*self.run(enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids")))
        return answers

    def describe(self) -> dict:
        """What /health and logs report about the model."""
        return {"task": self.spec.task, "objective": self.spec.objective, "policy": self.policy.describe(),
                "exits": self.consulted, "labels": self.spec.labels, "max_length": self.spec.max_length,
                "layers": self.spec.exit_layers[-1]}

