"""A pre-training run's own vocabulary: ``tokenizer=train``.

A small model on a small corpus spends much of its step on a 30k-token vocabulary it hardly
uses (the embedding matrix and the decoder). ``tokenizer=train`` trains a WordPiece
vocabulary of ``vocab.size`` tokens on the run's training text with the ``tokenizers``
trainer behind ``transformers``' ``train_new_from_iterator``, starting from ``vocab.base``
(whose normaliser, pre-tokeniser and special tokens it keeps: MiniLM's uncased BERT ones by
default). The result is cached under ``cache_dir/tokenizers/<key>``, keyed by the training
files' contents and the settings, so a resumed or repeated run gets the same vocabulary, and
copied into the run folder (and from there into the exported Hugging Face folder).

:func:`check_tokenizer` refuses, in one line, a tokenizer that masked-LM training cannot use.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from rbert.errors import ConfigError

MIN_VOCAB = 100  # below this a "vocabulary" is hardly more than the special tokens and the alphabet
MLM_SPECIAL = ("mask_token", "cls_token", "sep_token", "pad_token")
TRAIN = "train"  # the tokenizer setting that asks for a vocabulary trained here


def check_tokenizer(tokenizer: PreTrainedTokenizerBase, name: str) -> PreTrainedTokenizerBase:
    """``tokenizer`` if masked-LM pre-training can use it, else a one-line ConfigError naming ``tokenizer``."""
    missing = [t for t in MLM_SPECIAL if getattr(tokenizer, t, None) is None]
    if missing:
        raise ConfigError(f"tokenizer: {name} has no {', '.join(missing)}; masked-LM pre-training needs "
                          f"{', '.join(MLM_SPECIAL)}")
    if len(tokenizer) < MIN_VOCAB:
        raise ConfigError(f"tokenizer: {name} has only {len(tokenizer)} tokens (at least {MIN_VOCAB} expected)")
    return tokenizer


def files_digest(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def train_tokenizer(files: list[str | os.PathLike], size: int, base: str, cache_dir: str | os.PathLike,
                    out_dir: str | os.PathLike | None = None) -> Path:
    """The folder of a WordPiece tokenizer of ``size`` tokens trained on ``files`` (text, one
    paragraph a line), from ``base``'s tokenizer; trained once per (files, size, base)."""
    from rbert.models.hub import load_tokenizer, resolve

    if int(size) < MIN_VOCAB:
        raise ConfigError(f"vocab.size: {size} is too small (at least {MIN_VOCAB})")
    paths = [Path(f).expanduser() for f in files]
    for path in paths:
        if not path.is_file():
            raise ConfigError(f"{path}: missing (vocab.files: the text a vocabulary is trained on)")
    key = hashlib.sha256(f"{files_digest(paths)}|{int(size)}|{resolve(base)}|wordpiece-v1".encode()).hexdigest()[:16]
    cached = Path(cache_dir).expanduser() / "tokenizers" / key
    if not (cached / "tokenizer_config.json").is_file():
        template = load_tokenizer(base)
        if not template.is_fast:
            raise ConfigError(f"vocab.base: {base}'s tokenizer has no fast (tokenizers) version to train from")

        def lines():
            for path in paths:
                with open(path, encoding="utf-8") as f:
                    yield from (line for line in f if line.strip())

        trained = template.train_new_from_iterator(lines(), vocab_size=int(size))
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cached.parent, prefix=f".{key}."))
        try:  # written whole, then renamed: an interrupted run leaves no half-written vocabulary
            trained.save_pretrained(tmp)
            os.replace(tmp, cached)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not (cached / "tokenizer_config.json").is_file():  # not another process's finished copy
                raise
    if out_dir is None:
        return cached
    out = Path(out_dir)
    shutil.copytree(cached, out, dirs_exist_ok=True)
    return out
