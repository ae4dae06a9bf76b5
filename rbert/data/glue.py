"""GLUE (and custom) text classification data as a LightningDataModule.

Reads the canonical GLUE folder layout under ``data_dir`` with ``datasets``' CSV/JSON
loaders, or, when no ``data_dir`` is given, the same task from the Hugging Face hub.
Texts are tokenised once (``datasets`` caches the result on disk, keyed by the data, the
tokenizer and the settings) and padded per batch.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import datasets
import numpy as np
import pytorch_lightning as pl
from datasets.fingerprint import Hasher
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding

from rbert.data.resume import ResumableData
from rbert.data.tasks import TaskSpec
from rbert.errors import ConfigError
from rbert.models.hub import load_tokenizer, resolve

log = logging.getLogger(__name__)

MODEL_INPUTS = ("input_ids", "token_type_ids", "attention_mask", "labels")


def read_table(path: Path, task: TaskSpec, cache_dir: str | None = None, require_label: bool = True
               ) -> datasets.Dataset:
    """One local file as a Dataset with canonical column names: the text fields and ``label``."""
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".csv", ".txt"):
        kwargs = dict(
            delimiter="," if suffix == ".csv" else "\t",
            encoding="utf-8-sig",  # MRPC's files start with a byte-order mark
            keep_default_na=False, na_filter=False,  # a sentence "null" or "NA" is text
        )
        if suffix != ".csv":
            kwargs["quoting"] = csv.QUOTE_NONE  # GLUE TSVs hold unbalanced quotes
        if task.column_names:
            kwargs.update(header=None, column_names=task.column_names)
        builder = "csv"
    elif suffix in (".json", ".jsonl"):
        kwargs, builder = {}, "json"
    else:
        raise ConfigError(f"{path}: unsupported file type {suffix!r} (use .csv, .tsv, .json or .jsonl)")
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache_dir, **kwargs)
    except Exception as err:  # pandas/arrow parse errors carry no file name
        raise ConfigError(f"{path}: cannot parse as {builder}: {str(err).splitlines()[0]}") from err
    wanted = {task.file_column(c): c for c in task.text_fields}
    if require_label:
        wanted[task.file_column(task.label_field)] = "label"
    for column in wanted:
        if column not in ds.column_names:
            raise ConfigError(f"{path}: missing column {column!r} needed by task {task.name}; "
                              f"columns are {ds.column_names}")
    ds = ds.select_columns(list(wanted))
    return ds.rename_columns({k: v for k, v in wanted.items() if k != v})


class GlueDataModule(ResumableData, pl.LightningDataModule):
    """Train / evaluation dataloaders for one :class:`TaskSpec`.

    Args:
        task: the task.
        backbone: the model whose tokenizer to use (see :mod:`rbert.models.hub`).
        data_dir: GLUE root (holding ``SST-2/`` ...) or the task folder itself; ``None``
            loads the task from the Hugging Face hub.
        max_length: truncation length in tokens.
        train_limit: train on a random subset of this many rows (``None``: all).
        seed: picks the ``train_limit`` subset and shuffles the training rows (per epoch).
        cache_dir: where ``datasets`` keeps its Arrow caches (``None``: its default).
        shuffle: shuffle the training rows each epoch (off only to compare runs batch for batch).
        select_rows: carve this many rows out of the training file as a *selection* split
            (never trained on; taken before ``train_limit``). It becomes the validation set
            (checkpoint choice, ``val/*``) and the one early exit picks its threshold on, so
            the dev set is only reported (the ``test`` stage). ``None``: validate on dev.
        select_seed: picks the selection rows; fixed, not the run's seed, so every run of a
            sweep holds out the same rows.
    """

    def __init__(self, task: TaskSpec, backbone: str, data_dir: str | None = None, max_length: int = 128,
                 batch_size: int = 32, eval_batch_size: int = 128, train_limit: int | None = None,
                 num_workers: int = 0, seed: int = 0, cache_dir: str | None = None, shuffle: bool = True,
                 select_rows: int | None = None, select_seed: int = 0):
        super().__init__()
        if batch_size < 1 or eval_batch_size < 1:
            raise ConfigError(f"data.batch_size and data.eval_batch_size must be >= 1, got {batch_size}, "
                              f"{eval_batch_size}")
        if max_length < 8:
            raise ConfigError(f"data.max_length must be at least 8 tokens, got {max_length}")
        if train_limit is not None and train_limit < 1:
            raise ConfigError(f"data.train_limit must be >= 1 (or null: all rows), got {train_limit}")
        if select_rows is not None and select_rows < 1:
            raise ConfigError(f"data.select_rows must be >= 1 (or null: no selection split), got {select_rows}")
        self.task = task
        self.backbone = backbone
        self.data_dir = data_dir
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.train_limit = train_limit
        self.num_workers = num_workers
        self.seed = seed
        self.cache_dir = cache_dir
        self.shuffle = shuffle
        self.select_rows = select_rows
        self.select_seed = select_seed
        self.tokenizer = load_tokenizer(backbone)
        self.collate = DataCollatorWithPadding(self.tokenizer)
        self.splits: dict[str, datasets.Dataset] = {}

    # ------------------------------------------------------------------ reading
    def task_folder(self) -> Path | None:
        if self.data_dir is None:
            return None
        root = Path(self.data_dir).expanduser()
        if not root.is_dir():
            raise ConfigError(f"data_dir: {root} is not a folder")
        sub = self.task.data_subdir
        if sub and (root / sub).is_dir():
            return root / sub
        if any((root / f).exists() for f in self.task.splits.values()):
            return root  # data_dir names the task folder itself
        raise ConfigError(f"data_dir: {root} has no {sub or 'task'} folder with the {self.task.name} files "
                          f"({', '.join(self.task.splits.values())})")

    def read_split(self, split: str) -> datasets.Dataset:
        """Raw rows of one split (canonical columns, labels as written)."""
        folder = self.task_folder()
        if folder is not None:
            path = folder / self.task.splits[split]
            if not path.is_file():
                raise ConfigError(f"{path}: missing {split} split of task {self.task.name}")
            return read_table(path, self.task, self.cache_dir)
        hub = self.task.hub
        if not hub:
            raise ConfigError(f"data_dir: task {self.task.name} has no hub copy; set data_dir or RBERT_DATA_DIR")
        try:
            return datasets.load_dataset(hub["path"], hub.get("name"), split=hub["splits"][split],
                                         cache_dir=self.cache_dir)
        except (ConnectionError, OSError) as err:
            raise ConfigError(f"data_dir is not set and {hub['path']}/{hub.get('name')} could not be loaded from "
                              f"the hub ({type(err).__name__}); set data_dir or RBERT_DATA_DIR") from err

    def label_encoder(self, ds: datasets.Dataset, where: str):
        """A batched function (values, row numbers) -> class ids (floats for regression)."""
        task = self.task
        if task.is_regression:
            def encode(values, rows):
                try:
                    return [float(v) for v in values]
                except ValueError as err:
                    raise ConfigError(f"{where}: rows {rows[0] + 1}-{rows[-1] + 1}: regression label is not a number "
                                      f"({err})") from None
            return encode
        if isinstance(ds.features.get("label"), datasets.ClassLabel):  # hub copies: already ids
            return lambda values, rows: list(values)
        index = {label: i for i, label in enumerate(task.labels)}

        def encode(values, rows):
            out = []
            for row, value in zip(rows, values):
                if str(value) not in index:
                    raise ConfigError(f"{where}: row {row + 1}: label {value!r} is not one of task {task.name}'s "
                                      f"labels {task.labels}")
                out.append(index[str(value)])
            return out
        return encode

    def infer_labels(self, train: datasets.Dataset) -> None:
        """Custom tasks may leave ``labels`` unset: take the training file's values, sorted."""
        values = sorted({str(v) for v in train["label"]})
        if len(values) != self.task.num_labels:
            raise ConfigError(f"task {self.task.name}: training labels {values[:10]} are {len(values)} values, "
                              f"but num_labels={self.task.num_labels}")
        self.task.labels = values
        log.info("task %s: labels read from the training file: %s", self.task.name, values)

    def drop_empty_texts(self, raw: datasets.Dataset, split: str, where: str) -> datasets.Dataset:
        """Training rows with an empty (or whitespace-only) text are skipped, with a warning that
        counts them; in an evaluation split such a row is an error (it would change the set)."""
        empty = sorted({i for field in self.task.text_fields for i, v in enumerate(raw[field])
                        if v is None or not str(v).strip()})
        if not empty:
            return raw
        if split != "train":
            raise ConfigError(f"{where}: row {empty[0] + 1}: empty text ({len(empty)} such row(s) in this "
                              "evaluation file)")
        log.warning("%s: skipped %d training row(s) with an empty text (rows %s%s)", where, len(empty),
                    ", ".join(str(i + 1) for i in empty[:5]), ", ..." if len(empty) > 5 else "")
        keep = sorted(set(range(len(raw))) - set(empty))
        return raw.select(keep)

    def encode(self, split: str) -> datasets.Dataset:
        where = self.task.splits[split] if self.data_dir else f"hub {split}"
        raw = self.drop_empty_texts(self.read_split(split), split, where)
        if split == "train" and not self.task.is_regression and self.task.labels is None:
            self.infer_labels(raw)
        encode_labels = self.label_encoder(raw, where)  # row numbers: after skipped empty rows
        fields, tokenizer, max_length = self.task.text_fields, self.tokenizer, self.max_length

        def tokenize(batch, rows):
            out = tokenizer(*(batch[f] for f in fields), truncation=True, max_length=max_length)
            out["labels"] = encode_labels(batch["label"], rows)
            return out

        # The fingerprint is explicit: hashing a tokenizer object is not stable across calls.
        fingerprint = Hasher.hash([raw._fingerprint, resolve(self.backbone), tokenizer.vocab_size,
                                   type(tokenizer).__name__, fields, max_length, self.task.labels, "v1"])
        ds = raw.map(tokenize, batched=True, with_indices=True, remove_columns=raw.column_names,
                     new_fingerprint=fingerprint,
                     desc=f"tokenising {self.task.name} {split}")
        return ds.select_columns([c for c in MODEL_INPUTS if c in ds.column_names])

    # ------------------------------------------------------------------ Lightning hooks
    def prepare_data(self) -> None:
        # Rank 0 reads and tokenises everything once; other ranks then hit the cache in setup().
        for split in self.task.splits:
            self.encode(split)

    def setup(self, stage: str | None = None) -> None:
        # Evaluation alone (validate/test/predict) does not need the training split tokenised.
        # ... unless the selection split, carved from it, is wanted.
        needed = [s for s in self.task.splits if s != "train" or stage in (None, "fit") or self.select_rows]
        if all(s in self.splits for s in needed):
            return
        for split in needed:
            if split not in self.splits:
                self.splits[split] = self.encode(split)
        if self.splits.get("train") is not None:
            self.carve_train(self.splits["train"])
        log.info("task %s: %s", self.task.name, {k: len(v) for k, v in self.splits.items()})

    def carve_train(self, train: datasets.Dataset) -> None:
        """The selection split (``select_rows``) and the ``train_limit`` subset, by rows."""
        if self.select_rows:
            if self.select_rows >= len(train):
                raise ConfigError(f"data.select_rows={self.select_rows} leaves no training rows "
                                  f"(the training split has {len(train)})")
            order = np.random.default_rng(self.select_seed).permutation(len(train))
            self.splits["select"] = train.select(np.sort(order[:self.select_rows]))
            train = self.splits["train"] = train.select(np.sort(order[self.select_rows:]))
        if self.train_limit is not None and self.train_limit < len(train):
            rows = np.sort(np.random.default_rng(self.seed).permutation(len(train))[: self.train_limit])
            self.splits["train"] = train.select(rows)

    def _loader(self, ds: datasets.Dataset, batch_size: int, sharded: bool = True) -> DataLoader:
        """An evaluation loader in file order; under DDP each rank gets its share of the rows, none twice."""
        return DataLoader(ds, batch_size=batch_size, collate_fn=self.collate, num_workers=self.num_workers,
                          sampler=self.eval_sampler(ds) if sharded else None,
                          persistent_workers=self.num_workers > 0)

    def eval_loader(self, index: int = 0, batch_size: int | None = None) -> DataLoader:
        """The ``index``-th evaluation set, whole, in one process (early-exit evaluation after training)."""
        self.setup("validate")
        return self._loader(self.splits[self.task.eval_splits[index]], batch_size or self.eval_batch_size,
                            sharded=False)

    def selection_loader(self, batch_size: int | None = None) -> DataLoader:
        """Where thresholds are chosen: the selection split if ``select_rows`` carved one, else the
        first dev set (then the dev numbers reported beside a choice are not held out)."""
        self.setup("validate")
        split = "select" if "select" in self.splits else self.task.eval_splits[0]
        return self._loader(self.splits[split], batch_size or self.eval_batch_size, sharded=False)

    @property
    def val_splits(self) -> list[str]:
        """What validation (and the checkpoint choice) runs on: the selection split, or the dev sets."""
        return ["select"] if self.select_rows else self.task.eval_splits

    def train_dataloader(self) -> DataLoader:
        train = self.splits["train"]
        # Seeded shuffle (or file order), split over DDP ranks, resumable mid-epoch.
        return DataLoader(train, batch_size=self.batch_size, collate_fn=self.collate,
                          sampler=self.train_sampler(train, self.batch_size, self.seed, shuffle=self.shuffle),
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> list[DataLoader]:
        return [self._loader(self.splits[s], self.eval_batch_size) for s in self.val_splits]

    def test_dataloader(self) -> list[DataLoader]:
        # GLUE test labels are hidden, so "test" evaluates the dev set(s) unless a labelled test split is given.
        return [self._loader(self.splits[s], self.eval_batch_size) for s in self.test_splits]

    @property
    def test_splits(self) -> list[str]:
        return ["test"] if "test" in self.task.splits else self.task.eval_splits
