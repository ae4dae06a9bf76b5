"""Raw text for masked-language-model pre-training, as a LightningDataModule.

Reads plain-text files (one paragraph a line, documents separated by blank lines, as in
``../shared/data/text``) with ``datasets``' text loader, or a hub dataset by name, through
the same ``datasets.load_dataset(path, name, split=...)`` call that also reads a local
dataset folder. Lines are tokenised with the backbone's tokenizer and packed: the token
stream (a ``[SEP]`` between documents) is cut into blocks of ``max_seq_len - 2`` tokens,
each framed as ``[CLS] ... [SEP]``, so every block is full and no batch needs padding (the
tail of each group of 1,000 lines that fills no block is dropped). ``datasets`` caches the
packed blocks on disk.

Masking uses ``transformers.DataCollatorForLanguageModeling``'s rule (15% of the tokens;
of those 80% ``[MASK]``, 10% a random token, 10% unchanged), drawn for each block from a
generator seeded by the data itself rather than a global random state:

* training: by the run's seed, the epoch and the block's id, so masks are fresh every
  epoch, and a block masks the same whatever batch it lands in: a resumed run, a run on
  more DDP ranks or with another batch size sees the same masked tokens;
* validation: by a fixed seed and the block's id, so every run, whatever its batch size
  or seed, is scored on the same masked tokens and validation losses compare.

Training resumes mid-epoch at the same data position (:mod:`rbert.data.resume`).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import datasets
import numpy as np
import pytorch_lightning as pl
import torch
from datasets.fingerprint import Hasher
from torch.utils.data import DataLoader, Dataset
from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerBase

from rbert.data.resume import ResumableData
from rbert.data.vocab import check_tokenizer
from rbert.errors import ConfigError
from rbert.models.hub import load_tokenizer

log = logging.getLogger(__name__)

LINES_PER_GROUP = 1000  # lines packed together (datasets.map batch): the leftover tail of each is dropped


def pack_lines(lines: list[str], tokenizer: PreTrainedTokenizerBase, max_seq_len: int) -> list[list[int]]:
    """Token blocks of exactly ``max_seq_len``: ``[CLS] + tokens + [SEP]``, documents (split by blank
    lines) joined with ``[SEP]``; a tail too short for a block is dropped."""
    ids = tokenizer([line for line in lines if line.strip()], add_special_tokens=False, verbose=False)["input_ids"]
    stream: list[int] = []
    it = iter(ids)
    for line in lines:
        if line.strip():
            stream.extend(next(it))
        elif stream and stream[-1] != tokenizer.sep_token_id:  # a blank line ends a document
            stream.append(tokenizer.sep_token_id)
    body = max_seq_len - 2
    return [[tokenizer.cls_token_id, *stream[i:i + body], tokenizer.sep_token_id]
            for i in range(0, len(stream) - body + 1, body)]


def data_seed(*key: int) -> int:
    """A 63-bit seed from integers (stable across processes and runs, unlike ``hash``)."""
    digest = hashlib.blake2b(np.asarray(key, dtype=np.int64).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def unigram_nll(blocks: datasets.Dataset, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """-log p(token) under the unigram distribution of ``blocks``' non-special tokens (add-one
    smoothed; special tokens, never predicted, get probability 0): the best guess without context."""
    counts = np.zeros(len(tokenizer), dtype=np.float64)
    for chunk in blocks.with_format("numpy").iter(batch_size=4096):
        counts += np.bincount(chunk["input_ids"].reshape(-1), minlength=len(tokenizer))[:len(tokenizer)]
    counts += 1.0
    counts[sorted(tokenizer.all_special_ids)] = 0.0
    with np.errstate(divide="ignore"):
        return torch.as_tensor(-np.log(counts / counts.sum()), dtype=torch.float32)


class MaskingCollator:
    """Stacks ``(key, token ids)`` items and masks each block with the library's MLM rule, from a
    generator seeded by ``seed`` and the block's key (``(epoch, block id)`` in training, the
    block id in validation): its masks depend on nothing else."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, mlm_probability: float, seed: int):
        self.masker = DataCollatorForLanguageModeling(tokenizer, mlm_probability=mlm_probability)
        self.special_ids = torch.tensor(sorted(tokenizer.all_special_ids))
        self.seed = seed

    def _mask(self, ids: torch.Tensor, key: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        self.masker.generator = torch.Generator().manual_seed(data_seed(self.seed, *key))
        return self.masker.torch_mask_tokens(ids.clone(), special_tokens_mask=torch.isin(ids, self.special_ids))

    def __call__(self, items: list[tuple[tuple[int, ...], np.ndarray]]) -> dict[str, torch.Tensor]:
        ids = torch.as_tensor(np.stack([row for _, row in items]), dtype=torch.long)
        pairs = [self._mask(ids[i:i + 1], key) for i, (key, _) in enumerate(items)]
        return {"input_ids": torch.cat([p[0] for p in pairs]), "labels": torch.cat([p[1] for p in pairs])}


class Blocks(Dataset):
    """Packed blocks. An item is ``(key, token ids)``; ``key`` is what the sampler asked for:
    ``(epoch, block id)`` from the training sampler, a block id otherwise (as a 1-tuple)."""

    def __init__(self, ds: datasets.Dataset):
        self.ds = ds.with_format("numpy")

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[tuple[int, ...], np.ndarray]:
        key = tuple(int(k) for k in key) if isinstance(key, tuple) else (int(key),)
        return key, self.ds[key[-1]]["input_ids"]


class TextDataModule(ResumableData, pl.LightningDataModule):
    """Masked-LM batches of packed text blocks.

    Args:
        tokenizer: whose tokenizer to use (a ``backbone`` name, see :mod:`rbert.models.hub`).
        data_dir: folder of the text files; ``None`` loads ``hub`` instead.
        files: split -> file under ``data_dir``. ``train`` is trained on; every other split is an
            evaluation set logged under its name (``val``, ``val_wikitext2``; the first is monitored).
        hub: ``{path, name, text_column, splits: {split: hub split}}``, used when ``data_dir`` is
            unset (any ``datasets.load_dataset`` path: a hub id or a local dataset folder).
        max_seq_len: tokens per block, ``[CLS]`` and ``[SEP]`` included.
        mlm_probability: share of the tokens selected for prediction.
        seed: the training masks' and shuffle's seed; ``eval_mask_seed`` the validation masks'.
        cache_dir: where ``datasets`` keeps its Arrow caches (``None``: its default).
    """

    def __init__(self, tokenizer: str = "minilm", data_dir: str | None = None, files: dict | None = None,
                 hub: dict | None = None, max_seq_len: int = 128, batch_size: int = 32, eval_batch_size: int = 64,
                 mlm_probability: float = 0.15, num_workers: int = 0, seed: int = 0, eval_mask_seed: int = 0,
                 cache_dir: str | None = None):
        super().__init__()
        if max_seq_len < 8:
            raise ConfigError(f"data.max_seq_len must be at least 8, got {max_seq_len}")
        if not 0 < mlm_probability < 1:
            raise ConfigError(f"data.mlm_probability must lie in (0, 1), got {mlm_probability}")
        if batch_size < 1 or eval_batch_size < 1:
            raise ConfigError(f"data.batch_size and data.eval_batch_size must be >= 1, got {batch_size}, "
                              f"{eval_batch_size}")
        self.tokenizer_name = tokenizer
        self.data_dir = data_dir
        self.files = dict(files or {})
        self.hub = dict(hub) if hub else None
        self.max_seq_len = max_seq_len
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.cache_dir = cache_dir
        self.tokenizer = check_tokenizer(load_tokenizer(tokenizer, "tokenizer"), tokenizer)
        self.train_collate = MaskingCollator(self.tokenizer, mlm_probability, seed)
        self.eval_collate = MaskingCollator(self.tokenizer, mlm_probability, eval_mask_seed)
        splits = list(self.files if data_dir is not None else (self.hub or {}).get("splits", {}))
        evals = [s for s in splits if s != "train"]
        if "train" not in splits or evals[:1] != ["val"] or not all(s.startswith("val") for s in evals):
            where = "data.files" if data_dir is not None else "data.hub.splits"
            raise ConfigError(f"{where}: needs 'train' and 'val' (the monitored set), further evaluation sets "
                              f"named val_<name>; got {splits}")
        self.split_names = splits
        self.splits: dict[str, datasets.Dataset] = {}
        self.unigram_nll: torch.Tensor | None = None  # set up with the training split

    @property
    def eval_splits(self) -> list[str]:
        """Evaluation sets in order (logging prefixes); the first is the monitored one."""
        return [s for s in self.split_names if s != "train"]

    # ------------------------------------------------------------------ reading
    def read_split(self, split: str) -> datasets.Dataset:
        """One split as a Dataset with a ``text`` column, one line a row."""
        if self.data_dir is not None:
            root = Path(self.data_dir).expanduser()
            path = root / self.files[split]
            if not path.is_file():
                raise ConfigError(f"{path}: missing (data.files.{split} under data_dir)")
            return datasets.load_dataset("text", data_files=str(path), split="train", cache_dir=self.cache_dir)
        hub = self.hub
        try:
            ds = datasets.load_dataset(hub["path"], hub.get("name"), split=hub["splits"][split],
                                       cache_dir=self.cache_dir)
        except (ConnectionError, OSError, ValueError) as err:
            raise ConfigError(f"data.hub: {hub['path']}/{hub.get('name')} split {hub['splits'][split]!r} could not "
                              f"be loaded ({type(err).__name__}: {str(err).splitlines()[0]}); "
                              "set data_dir or RBERT_TEXT_DIR for local files") from err
        column = hub.get("text_column", "text")
        if column not in ds.column_names:
            raise ConfigError(f"data.hub.text_column: {hub['path']} has no column {column!r}; "
                              f"columns are {ds.column_names}")
        return ds.select_columns([column]).rename_columns({column: "text"} if column != "text" else {})

    def encode(self, split: str) -> datasets.Dataset:
        raw = self.read_split(split)
        tokenizer, max_seq_len = self.tokenizer, self.max_seq_len
        # Explicit fingerprint: hashing a tokenizer object is not stable across calls. Its vocabulary
        # is the key, not its name: a trained vocabulary lives in each run's own folder.
        fingerprint = Hasher.hash([raw._fingerprint, sorted(tokenizer.get_vocab().items()),
                                   type(tokenizer).__name__, max_seq_len, LINES_PER_GROUP, "packed-v2"])
        ds = raw.map(lambda batch: {"input_ids": pack_lines(batch["text"], tokenizer, max_seq_len)},
                     batched=True, batch_size=LINES_PER_GROUP, remove_columns=raw.column_names,
                     new_fingerprint=fingerprint, desc=f"tokenising and packing {split}")
        if len(ds) == 0:
            raise ConfigError(f"data split {split!r}: no text, or too little for one block of {max_seq_len} tokens")
        return ds

    # ------------------------------------------------------------------ Lightning hooks
    def prepare_data(self) -> None:
        for split in self.split_names:  # rank 0 tokenises once; other ranks hit the cache in setup()
            self.encode(split)

    def setup(self, stage: str | None = None) -> None:
        for split in self.split_names:
            if split not in self.splits:
                self.splits[split] = self.encode(split)
        log.info("text blocks of %d tokens: %s", self.max_seq_len, {k: len(v) for k, v in self.splits.items()})
        self.unigram_nll = unigram_nll(self.splits["train"], self.tokenizer)

    def train_dataloader(self) -> DataLoader:
        blocks = Blocks(self.splits["train"])
        return DataLoader(blocks, batch_size=self.batch_size, collate_fn=self.train_collate,
                          sampler=self.train_sampler(blocks, self.batch_size, self.seed, with_epoch=True),
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> list[DataLoader]:
        loaders = []
        for split in self.eval_splits:
            blocks = Blocks(self.splits[split])
            loaders.append(DataLoader(blocks, batch_size=self.eval_batch_size, collate_fn=self.eval_collate,
                                      sampler=self.eval_sampler(blocks), num_workers=self.num_workers))
        return loaders
