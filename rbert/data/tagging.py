"""Sequence-labelling data as a LightningDataModule: words -> word pieces, tags -> first pieces.

The files are read by :mod:`rbert.data.tagging_files` (or the task comes from the hub), the
tag set is checked against the training file, and every sentence becomes one or more
*windows* (:func:`rbert.inference.words.word_windows`): a sentence longer than
``max_length`` pieces is cut into overlapping windows instead of truncated, and each word is
labelled in the one window that owns it, so the loss and the metrics count every word once.
Rows carry their sentence number, so metrics that need whole sentences (entity F1) put the
windows back together.

Selection split, ``train_limit`` and shuffling work on sentences as for GLUE
(:class:`~rbert.data.glue.GlueDataModule`, whose folder lookup and loaders this module reuses).
"""

from __future__ import annotations

import logging

import datasets
import numpy as np
import torch

from rbert.data.glue import GlueDataModule
from rbert.data.tagging_files import Sentence, check_bio, read_sentences
from rbert.data.tasks import TaggingTask
from rbert.errors import ConfigError
from rbert.inference.words import IGNORE, tag_rows

log = logging.getLogger(__name__)


def tag_order(sentences: list[Sentence]) -> list[str]:
    """The tag set of a training file: ``O`` first (if present), the rest sorted."""
    tags = {t for s in sentences for t in s.tags}
    return (["O"] if "O" in tags else []) + sorted(tags - {"O"})


def special_ids(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after one sequence ([CLS] / [SEP], <s> / </s>)."""
    marked = tokenizer("x", add_special_tokens=True)["input_ids"]
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    for i in range(len(marked) - len(plain) + 1):
        if marked[i:i + len(plain)] == plain:
            return marked[:i], marked[i + len(plain):]
    raise ConfigError("backbone: its tokenizer changes a word when it adds special tokens; cannot align words")


def encode_sentences(tokenizer, sentences: list[Sentence], tag_ids: dict[str, int] | None, max_length: int
                     ) -> tuple[dict[str, list], int]:
    """Rows (one per window) of model inputs, first-piece labels and sentence and window numbers,
    and how many sentences needed more than one window."""
    before, after = special_ids(tokenizer)
    pieces = tokenizer([s.words for s in sentences], is_split_into_words=True, add_special_tokens=False)
    per_sentence = []
    for number, sentence in enumerate(sentences):
        per_word: list[list[int]] = [[] for _ in sentence.words]
        for piece, word in zip(pieces["input_ids"][number], pieces.word_ids(number)):
            per_word[word].append(piece)
        per_sentence.append(per_word)
    rows, windowed = tag_rows(per_sentence, max_length, before, after, tokenizer.unk_token_id)
    out = {"input_ids": [], "attention_mask": [], "labels": [], "sentence": [], "window": []}
    for row in rows:
        labels = [IGNORE] * len(row.ids)
        if tag_ids is not None:
            for position, word in zip(row.positions, row.words):
                labels[position] = tag_ids[sentences[row.sentence].tags[word]]
        out["input_ids"].append(row.ids)
        out["attention_mask"].append([1] * len(row.ids))
        out["labels"].append(labels)
        out["sentence"].append(row.sentence)
        out["window"].append(row.window)
    return out, windowed


class TagCollator:
    """Pad a batch of windows: pad id, mask 0, label IGNORE; sentence and window numbers as tensors."""

    def __init__(self, pad_id: int):
        self.pad = {"input_ids": pad_id, "attention_mask": 0, "token_type_ids": 0, "labels": IGNORE}

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        batch = {key: torch.tensor([list(r[key]) + [value] * (width - len(r[key])) for r in rows])
                 for key, value in self.pad.items() if key in rows[0]}
        for key in ("sentence", "window"):
            batch[key] = torch.tensor([r[key] for r in rows])
        return batch


class TaggingDataModule(GlueDataModule):
    """Train / evaluation dataloaders of a :class:`~rbert.data.tasks.TaggingTask` (see the module
    docstring); the arguments are :class:`~rbert.data.glue.GlueDataModule`'s, counted in sentences."""

    def __init__(self, task: TaggingTask, *args, **kwargs):
        if not isinstance(task, TaggingTask):
            raise ConfigError(f"data: task {task.name} is not a tagging task; use data=glue")
        super().__init__(task, *args, **kwargs)
        if self.tokenizer.pad_token_id is None:
            raise ConfigError(f"backbone: {self.backbone!r}'s tokenizer has no padding token")
        self.collate = TagCollator(self.tokenizer.pad_token_id)
        self.windowed: dict[str, int] = {}  # split -> sentences cut into several windows

    # ------------------------------------------------------------------ reading
    def read_sentences(self, split: str) -> tuple[list[Sentence], str]:
        """The sentences of one split, and where they came from (for messages)."""
        task = self.task
        folder = self.task_folder()
        if folder is not None:
            path = folder / task.splits[split]
            return read_sentences(path, task.format, task.tag_field, task.word_field), str(path)
        hub = task.hub
        if not hub:
            raise ConfigError(f"data_dir: task {task.name} has no hub copy; set data_dir or RBERT_TAGGING_DIR")
        try:
            ds = datasets.load_dataset(hub["path"], hub.get("name"), split=hub["splits"][split],
                                       revision=hub.get("revision"), cache_dir=self.cache_dir)
        except (ConnectionError, OSError) as err:
            raise ConfigError(f"data_dir is not set and {hub['path']} could not be loaded from the hub "
                              f"({type(err).__name__}); set data_dir or RBERT_TAGGING_DIR") from err
        return hub_sentences(ds, hub.get("tokens", "tokens"), hub.get("tags", "tags")), f"hub {hub['path']} {split}"

    def check_tags(self, sentences: list[Sentence], split: str, where: str) -> None:
        task = self.task
        if task.scheme == "bio":
            repaired = check_bio(where, sentences, repair=task.bad_bio == "repair")
            if repaired:
                log.warning("%s: %d I- tag(s) that followed nothing read as B- (task.bad_bio=repair)", where, repaired)
        if split == "train" and task.labels is None:
            tags = tag_order(sentences)
            if len(tags) != task.num_labels:
                raise ConfigError(f"task {task.name}: the training file has {len(tags)} tags {tags[:20]}, but "
                                  f"num_labels={task.num_labels}")
            task.labels = tags
            log.info("task %s: tags read from the training file: %s", task.name, tags)
        known = set(task.labels or [])
        for sentence in sentences:
            for tag, line in zip(sentence.tags, sentence.lines):
                if tag not in known:
                    raise ConfigError(f"{where}:{line}: tag {tag!r} is not one of task {task.name}'s "
                                      f"{len(known)} tags (the training file's; list them in task.labels)")

    def encode(self, split: str) -> datasets.Dataset:
        if split != "train" and self.task.labels is None:
            self.encode("train")  # the tag set comes from train
        sentences, where = self.read_sentences(split)
        if not sentences:
            raise ConfigError(f"{where}: no sentences")
        self.check_tags(sentences, split, where)
        tag_ids = {t: i for i, t in enumerate(self.task.labels)}
        rows, windowed = encode_sentences(self.tokenizer, sentences, tag_ids, self.max_length)
        self.windowed[split] = windowed
        if windowed:
            log.info("%s: %d of %d sentences longer than %d pieces, split into overlapping windows", where,
                     windowed, len(sentences), self.max_length)
        return datasets.Dataset.from_dict(rows)

    def prepare_data(self) -> None:
        """Nothing to download or cache: files are read (fast) where they are used, in ``setup``."""

    # ------------------------------------------------------------------ splits
    def carve_train(self, train: datasets.Dataset) -> None:
        """Selection split and ``train_limit`` count sentences: a sentence's windows stay together."""
        sentence = np.asarray(train["sentence"])
        count = int(sentence.max()) + 1
        if self.select_rows:
            if self.select_rows >= count:
                raise ConfigError(f"data.select_rows={self.select_rows} leaves no training sentences "
                                  f"(the training split has {count})")
            held = np.random.default_rng(self.select_seed).permutation(count)[:self.select_rows]
            chosen = np.isin(sentence, held)
            self.splits["select"] = train.select(np.flatnonzero(chosen))
            train = train.select(np.flatnonzero(~chosen))
            sentence = sentence[~chosen]
        if self.train_limit is not None:
            present = np.unique(sentence)
            if self.train_limit < len(present):
                keep = np.random.default_rng(self.seed).permutation(present)[:self.train_limit]
                train = train.select(np.flatnonzero(np.isin(sentence, keep)))
        self.splits["train"] = train


def hub_sentences(ds: datasets.Dataset, tokens: str, tags: str) -> list[Sentence]:
    """Sentences of a hub dataset with a column of words and one of tags (ids of a ClassLabel
    sequence, as ``wnut_17``'s ``ner_tags``, or strings)."""
    for column in (tokens, tags):
        if column not in ds.column_names:
            raise ConfigError(f"task.hub: column {column!r} is not in the hub dataset ({ds.column_names})")
    feature = ds.features[tags]
    names = getattr(getattr(feature, "feature", None), "names", None)
    out = []
    for row, (words, ids) in enumerate(zip(ds[tokens], ds[tags])):
        out.append(Sentence(list(words), [names[i] if names else str(i) for i in ids], [row + 1] * len(words)))
    return [s for s in out if s.words]
