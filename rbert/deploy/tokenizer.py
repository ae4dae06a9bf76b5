"""The exported folder's tokenizer, in ``tokenizers`` alone.

Training tokenises with a ``transformers`` fast tokenizer, and every fast tokenizer is a
``tokenizers.Tokenizer`` (normaliser, pre-tokeniser, model, post-processor) that
``save_pretrained`` writes to ``tokenizer.json``. Loading that file with ``tokenizers``
gives the same pieces and ids without importing transformers (and torch through it), which
is what lets the ONNX runtime and its server start in a fraction of a second in a small
image. What ``transformers`` adds on top for a call (truncation of the longest text first,
padding on the right with the pad token, the arrays) is set here explicitly; the tests
check the ids, masks and token types against ``AutoTokenizer`` for single texts, pairs and
over-long texts.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np

from rbert.deploy.folder import FolderError


class FolderTokenizer:
    """``tokenizer.json`` of an exported folder: texts (or pairs) in, int64 arrays out.

    One call at a time (a lock): a ``tokenizers.Tokenizer`` keeps its truncation and padding
    settings on the object, so two threads at once (the server's event loop checking lengths
    while its worker encodes a batch) would corrupt each other's settings.
    """

    def __init__(self, tokenizer, pad_token: str, pad_type_id: int = 0):
        pad_id = tokenizer.token_to_id(pad_token)
        if pad_id is None:
            raise ValueError(f"the pad token {pad_token!r} is not in the vocabulary")
        self.tokenizer, self.pad_token, self.pad_id, self.pad_type_id = tokenizer, pad_token, pad_id, pad_type_id
        self.lock = threading.Lock()

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> FolderTokenizer:
        from tokenizers import Tokenizer

        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise FolderError(f"{folder}: no tokenizer.json (exported with a slow tokenizer? export it again)")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises its own Exception type for a bad file
            raise FolderError(f"{path}: tokenizers cannot read it: {str(err).splitlines()[0]}") from err
        config = {}
        if (folder / "tokenizer_config.json").is_file():
            try:
                config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise FolderError(f"{folder / 'tokenizer_config.json'}: not valid JSON: {err}") from err
        pad = config.get("pad_token", "[PAD]")
        pad = pad.get("content") if isinstance(pad, dict) else pad  # an AddedToken as transformers 4 wrote it
        try:
            return cls(tokenizer, str(pad), int(config.get("pad_token_type_id", 0)))
        except ValueError as err:
            raise FolderError(f"{folder / 'tokenizer_config.json'}: pad_token: {err}") from err

    def _encode(self, rows: list[tuple[str, ...]], max_length: int | None) -> list:
        inputs = [row[0] if len(row) == 1 else (row[0], row[1]) for row in rows]
        with self.lock:
            if max_length is None:
                self.tokenizer.no_truncation()
                self.tokenizer.no_padding()
            else:  # as transformers' truncation=True: the longer text of a pair loses tokens first
                self.tokenizer.enable_truncation(max_length, strategy="longest_first", direction="right")
                self.tokenizer.enable_padding(direction="right", pad_id=self.pad_id, pad_type_id=self.pad_type_id,
                                              pad_token=self.pad_token)
            return self.tokenizer.encode_batch(inputs)

    def split(self, text: str) -> list[str]:
        """Raw text as words, split by the tokenizer's own pre-tokenizer (whitespace without one)."""
        pre = self.tokenizer.pre_tokenizer
        return [w for w, _ in pre.pre_tokenize_str(text)] if pre is not None else text.split()

    def word_pieces(self, sentences: list[list[str]]) -> list[list[list[int]]]:
        """Each sentence's words as their piece ids (no special tokens, nothing cut)."""
        with self.lock:
            self.tokenizer.no_truncation()
            self.tokenizer.no_padding()
            encodings = self.tokenizer.encode_batch(sentences, is_pretokenized=True, add_special_tokens=False)
        out = []
        for words, encoding in zip(sentences, encodings):
            per_word: list[list[int]] = [[] for _ in words]
            for piece, word in zip(encoding.ids, encoding.word_ids):
                per_word[word].append(piece)
            out.append(per_word)
        return out

    def specials(self) -> tuple[list[int], list[int]]:
        """The ids the post-processor puts before and after one sequence ([CLS] / [SEP])."""
        with self.lock:
            self.tokenizer.no_truncation()
            self.tokenizer.no_padding()
            marked = self.tokenizer.encode(["x"], is_pretokenized=True, add_special_tokens=True).ids
            plain = self.tokenizer.encode(["x"], is_pretokenized=True, add_special_tokens=False).ids
        for i in range(len(marked) - len(plain) + 1):
            if marked[i:i + len(plain)] == plain:
                return marked[:i], marked[i + len(plain):]
        raise ValueError("the tokenizer changes a word when it adds special tokens")

    @property
    def unk_id(self) -> int:
        model = self.tokenizer.model
        token = getattr(model, "unk_token", None)
        found = self.tokenizer.token_to_id(token) if token else None
        return self.pad_id if found is None else found

    def lengths(self, rows: list[tuple[str, ...]]) -> list[int]:
        """Each row's length in tokens, untruncated (special tokens included)."""
        return [len(e.ids) for e in self._encode(rows, None)]

    def __call__(self, rows: list[tuple[str, ...]], max_length: int) -> dict[str, np.ndarray]:
        """``input_ids``, ``token_type_ids`` and ``attention_mask`` (batch, longest row), int64,
        truncated at ``max_length`` and padded on the right."""
        encodings = self._encode(rows, max_length)
        return {"input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
                "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
                "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64)}
