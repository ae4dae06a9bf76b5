"""``mode=predict`` for a tagging checkpoint: sentences in, one tag per word out, as CoNLL.

Input (``predict.input``): ``.conll`` / ``.txt`` with a tab (CoNLL columns: the first is the
word; other columns are ignored), ``.conllu`` (its words), ``.jsonl`` (``{"tokens": [...]}``)
or a ``.txt`` of raw text, one sentence a line, split into words by the tokenizer's own
pre-tokenizer (BERT's splits at spaces and punctuation: ``don't`` becomes ``don ' t``,
where UD has ``do n't``). Output (``predict.output``): CoNLL columns ``word, tag,
exit_layer`` (the layer the word left at: with SENTEE its sentence's, one exit for all its words; a
sentence cut into windows reports its deepest), a blank line between sentences.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from rbert.data.tagging import special_ids
from rbert.data.tagging_files import read_sentences
from rbert.errors import ConfigError
from rbert.inference.engine import EarlyExit
from rbert.inference.prepare import Setup, resolve_budget
from rbert.inference.tokee import TokenEarlyExit
from rbert.inference.token_policies import WindowEntropyExit
from rbert.inference.words import bio_transitions, decode_rows, pad_rows, piece_owners, stitch, tag_rows
from rbert.report import atomic_write_text


def split_text(tokenizer, text: str) -> list[str]:
    """Words of raw text as the tokenizer's pre-tokenizer splits them (whitespace if it has none)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pre = backend.pre_tokenizer if backend is not None else None
    if pre is None:
        return text.split()
    return [word for word, _ in pre.pre_tokenize_str(text)]


def read_words(path: Path, tokenizer) -> list[list[str]]:
    """The sentences of ``path`` as lists of words (see the module docstring for the formats)."""
    if not path.is_file():
        raise ConfigError(f"predict.input: {path} does not exist")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8-sig")
    if suffix == ".conllu":
        return [s.words for s in read_sentences(path, "conllu", None)]
    if suffix == ".jsonl":
        return [s.words for s in read_sentences(path, "jsonl", None, "tokens")]
    if suffix == ".conll" or (suffix == ".txt" and "\t" in text):
        return [s.words for s in read_sentences(path, "conll", None)]
    if suffix == ".txt":
        return [split_text(tokenizer, line) for line in text.splitlines() if line.strip()]
    raise ConfigError(f"predict.input: {path}: a tagging task reads .conll, .conllu, .jsonl or .txt")


def piece_ids(tokenizer, sentences: list[list[str]]) -> list[list[list[int]]]:
    """Each sentence's words as their word-piece ids."""
    pieces = tokenizer(sentences, is_split_into_words=True, add_special_tokens=False)
    out = []
    for number, words in enumerate(sentences):
        per_word: list[list[int]] = [[] for _ in words]
        for piece, word in zip(pieces["input_ids"][number], pieces.word_ids(number)):
            per_word[word].append(piece)
        out.append(per_word)
    return out


def run(cfg: DictConfig, setup: Setup) -> Path:
    system, net, layers, device, autocast = setup.system, setup.net, setup.layers, setup.device, setup.autocast
    task = system.task
    policy, _ = resolve_budget(setup)
    tokenizer = setup.datamodule.tokenizer
    sentences = read_words(Path(cfg.predict.input), tokenizer)
    before, after = special_ids(tokenizer)
    rows, windowed = tag_rows(piece_ids(tokenizer, sentences), setup.datamodule.max_length, before, after,
                              tokenizer.unk_token_id)
    token_level = isinstance(policy, WindowEntropyExit)
    if token_level:
        engine = TokenEarlyExit(net, policy, layers)
    else:
        engine = EarlyExit(net, policy, layers) if net is not None else None
    transitions = bio_transitions(task.labels) if task.scheme == "bio" else None
    tags, exits = [], []
    for start in range(0, len(rows), cfg.eval.batch_size):
        chunk = rows[start:start + cfg.eval.batch_size]
        ids, mask, words = (torch.from_numpy(a).to(device) for a in pad_rows(chunk, tokenizer.pad_token_id))
        with torch.no_grad(), autocast():
            if engine is None:
                z = system({"input_ids": ids, "attention_mask": mask})[-1]
                layer = torch.full((len(chunk),), system.exit_layers[-1])
            elif token_level:  # each word's own exit layer, kept at its first piece like its tag
                owner = torch.from_numpy(piece_owners(chunk, ids.shape[1])).to(device)
                result = engine(ids, mask, None, owner)
                z, layer = result.logits, result.exit_layer
            else:
                result = engine(ids, mask, words=words)
                z, layer = result.logits, result.exit_layer
        tags.extend(decode_rows(z.float().cpu().numpy(), words.cpu().numpy(), transitions))
        exits.extend(layer.cpu().numpy() if token_level else layer.tolist())
    width = max(len(t) for t in tags)
    padded = np.stack([np.pad(t, (0, width - len(t))) for t in tags])
    lengths = [len(s) for s in sentences]
    if token_level:
        per_word = np.stack([np.pad(e, (0, width - len(e))) for e in exits])
        none = np.zeros(len(rows))
        answered = [(t, layers_) for (t, _), (layers_, _) in zip(stitch(rows, padded, none, lengths),
                                                                   stitch(rows, per_word, none, lengths))]
    else:
        answered = [(t, [layer] * len(t)) for t, layer in stitch(rows, padded, np.array(exits), lengths)]
    lines = []
    for words, (tag_ids, layers_) in zip(sentences, answered):
        lines += [f"{w}\t{task.labels[t]}\t{n}" for w, t, n in zip(words, tag_ids, layers_)] + [""]
    output = Path(cfg.predict.output)
    atomic_write_text(output, "\n".join(lines))
    print(f"{len(sentences)} sentences tagged ({policy.describe()}; {windowed} cut into windows) written to {output}")
    return output
