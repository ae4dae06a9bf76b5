"""Does masked-LM pre-training learn? A defect check that stays, and the numbers every report needs.

A synthetic copy task (each line a pattern of 4 words repeated) makes context the only way
below the unigram floor. rbert's model must learn it exactly as fast as ``transformers``'
``BertForMaskedLM`` from the same weights on the same batches: in a plain loop, and on the
batches of rbert's own pipeline (own vocabulary, packing, masking); ``run.py`` end to end must
learn it too, and report the floor and the context gain.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import transformers

from bench.mlm_copy_task import copy_task, train_side_by_side
from rbert.data.text import MaskingCollator, TextDataModule, unigram_nll
from rbert.data.vocab import check_tokenizer, train_tokenizer
from rbert.errors import ConfigError
from rbert.models import load_tokenizer
from rbert.models.mlm import IGNORE_INDEX, BertForMaskedLM
from rbert.systems.mlm import shuffle_context
from tests.test_pretrain import NO_DROPOUT, pretrain_cli, tiny_mlm

SYLLABLES = ["ba", "ko", "mi", "tu", "re", "sa", "lo", "ne", "di", "gu"]
WORDS = [a + b + c for a in SYLLABLES for b in SYLLABLES for c in SYLLABLES[:2]]  # 200 "words"


@pytest.fixture()
def one_thread():
    """These tests time nothing, but a tiny model trains ~3x faster on one thread than on two busy ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_copy_corpus(root: Path, lines: dict[str, int], period: int = 4, repeats: int = 8, seed: int = 0) -> Path:
    """Text files where every line repeats a random ``period``-word pattern: each masked word is
    visible elsewhere in its line, while word frequencies are uniform (the floor is ln #words)."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for name, count in lines.items():
        docs = [" ".join(rng.sample(WORDS, period) * repeats) for _ in range(count)]
        (root / name).write_text("\n\n".join(docs) + "\n")
    return root


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("minilm")


@pytest.fixture(scope="module")
def copy_corpus(tmp_path_factory) -> Path:
    return write_copy_corpus(tmp_path_factory.mktemp("copy"), {"train.txt": 300, "valid.txt": 40})


# ---------------------------------------------------------------------------- the defect check
def test_rbert_learns_the_copy_task_as_fast_as_transformers(one_thread):
    curve = copy_task(vocab=100, hidden=32, steps=250, lr=5e-3, batch=16, length=32, period=4)
    for point in curve:  # the same weights, batches and optimiser: the same trajectory
        assert point["rbert/loss"] == pytest.approx(point["transformers/loss"], abs=1e-3)
        assert point["rbert/accuracy"] == pytest.approx(point["transformers/accuracy"], abs=0.02)
    assert curve[0]["rbert/accuracy"] < 0.2 and curve[-1]["rbert/accuracy"] > 0.9  # it learnt to copy


def test_pipeline_batches_teach_both_models_alike(copy_corpus, tmp_path, one_thread):
    """Own vocabulary, packing and masking in the loop: batches from TextDataModule."""
    folder = train_tokenizer([copy_corpus / "train.txt"], 300, "minilm", tmp_path / "cache")
    data = TextDataModule(tokenizer=str(folder), data_dir=str(copy_corpus), max_seq_len=32, batch_size=16,
                          files={"train": "train.txt", "val": "valid.txt"}, cache_dir=str(tmp_path / "cache"))
    data.setup("fit")
    vocab = len(data.tokenizer)
    assert all(len(data.tokenizer.tokenize(w)) == 1 for w in WORDS)  # one token a word

    def batches():  # epoch after epoch of the pipeline's own training batches
        while True:
            yield from ((b["input_ids"], b["labels"]) for b in data.train_dataloader())

    val = next(iter(data.val_dataloader()[0]))
    curve = train_side_by_side(vocab, 32, 300, 5e-3, batches(), (val["input_ids"], val["labels"]))
    for point in curve:
        assert point["rbert/loss"] == pytest.approx(point["transformers/loss"], abs=1e-3)
        assert point["rbert/accuracy"] == pytest.approx(point["transformers/accuracy"], abs=0.02)
    # From 0.5% (a guess among 200 words) to copying many masked words from their line.
    assert curve[0]["rbert/accuracy"] < 0.05 and curve[-1]["rbert/accuracy"] > 0.4


def test_run_py_learns_the_copy_task_and_reports_floor_and_context_gain(copy_corpus, tmp_path):
    run = tmp_path / "run"
    proc = pretrain_cli(run, copy_corpus, *NO_DROPOUT, "tokenizer=train", "vocab.size=300", "data.batch_size=16",
                        "model.optimizer.lr=5e-3", "model.schedule=constant", "trainer.max_steps=300",
                        "trainer.val_check_interval=150", "logger=none")
    final = json.loads((run / "results.json").read_text())["final"]
    assert 5.3 < final["val/floor"] < 5.5  # ~ln 200: the words are about equally frequent
    assert final["val/below_floor"] == pytest.approx(final["val/floor"] - final["val/loss"], abs=1e-5)
    # 0.5% is a guess among 200 words; ~60% copying after 300 steps (test above)
    assert final["val/accuracy"] > 0.3 and final["val/context_gain"] > 2.0
    assert {"floor", "below_floor", "context_gain"} <= set(proc.stdout.split())  # the result table
    # The trained vocabulary lives in the run folder and in the exported model.
    for folder in (run / "tokenizer", run / "hf"):
        assert transformers.AutoTokenizer.from_pretrained(folder).get_vocab() == \
            transformers.AutoTokenizer.from_pretrained(run / "tokenizer").get_vocab()
    assert 200 < len(transformers.AutoTokenizer.from_pretrained(run / "hf")) <= 300  # fewer: no more merges


# ---------------------------------------------------------------------------- small guarantees
def test_a_tiny_model_overfits_one_batch(tokenizer, one_thread):
    model = tiny_mlm(dropout=0.0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 120, (4, 24), generator=g)
    labels = ids.masked_fill(torch.rand(ids.shape, generator=g) > 0.3, IGNORE_INDEX)
    inputs = ids.masked_fill(labels != IGNORE_INDEX, 4)  # every selected token as the [MASK] id
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        loss = model(inputs, labels=labels).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert loss.item() < 0.05


def test_masked_positions_never_leak_their_token(tokenizer):
    """What a [MASK]ed position held changes nothing the model sees: not the inputs the collator
    builds, not the logits (labels enter the loss only)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (16, 32), generator=g)
    ids[:, 0], ids[:, -1] = tokenizer.cls_token_id, tokenizer.sep_token_id
    collate = MaskingCollator(tokenizer, 0.15, seed=3)
    batch = collate([((0, i), row.numpy()) for i, row in enumerate(ids)])
    hidden = batch["input_ids"] == tokenizer.mask_token_id
    assert hidden.any()
    other = ids.clone()
    other[hidden] = (other[hidden] - 1000 + 7) % 29000 + 1000  # other tokens behind the same masks
    again = collate([((0, i), row.numpy()) for i, row in enumerate(other)])
    assert torch.equal(again["input_ids"], batch["input_ids"]) and not torch.equal(again["labels"], batch["labels"])
    model = BertForMaskedLM(transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=64)).eval()
    with torch.no_grad():
        a = model(batch["input_ids"], labels=batch["labels"])
        b = model(again["input_ids"], labels=again["labels"])
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)


def test_unigram_floor_and_shuffled_context(tokenizer):
    import datasets

    cls, sep, mask = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.mask_token_id
    blocks = datasets.Dataset.from_dict({"input_ids": [[cls, 2000, 2000, 2001, sep], [cls, 2000, 2002, 2002, sep]]})
    nll = unigram_nll(blocks, tokenizer)
    total = 6 + len(tokenizer) - len(set(tokenizer.all_special_ids))  # 6 counts, add-one smoothing
    assert nll[2000].item() == pytest.approx(-torch.log(torch.tensor(4 / total)).item(), rel=1e-5)
    assert nll[2001].item() == pytest.approx(-torch.log(torch.tensor(2 / total)).item(), rel=1e-5)
    assert torch.isinf(nll[cls]) and torch.isinf(nll[mask])  # never predicted
    # Shuffling moves context tokens only, within their row.
    ids = torch.tensor([[cls, 1010, 1011, mask, 1012, 1013, 1014, sep], [cls, 1020, mask, 1021, 1022, 1023, 1024, sep]])
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 3], labels[1, 2] = 5000, 5001
    special = torch.tensor(sorted(tokenizer.all_special_ids))
    shuffled = shuffle_context(ids, labels, special, torch.Generator().manual_seed(0))
    assert torch.equal(shuffled[:, [0, -1]], ids[:, [0, -1]]) and shuffled[0, 3] == mask and shuffled[1, 2] == mask
    assert all(sorted(s.tolist()) == sorted(r.tolist()) for s, r in zip(shuffled, ids))
    assert not torch.equal(shuffled, ids)


# ---------------------------------------------------------------------------- tokenizer=train
def test_trained_vocabulary_is_cached_by_files_and_size(copy_corpus, tmp_path):
    cache = tmp_path / "cache"
    first = train_tokenizer([copy_corpus / "train.txt"], 300, "minilm", cache)
    stamp = (first / "tokenizer.json").stat().st_mtime_ns
    assert train_tokenizer([copy_corpus / "train.txt"], 300, "minilm", cache) == first  # found, not retrained
    assert (first / "tokenizer.json").stat().st_mtime_ns == stamp
    assert train_tokenizer([copy_corpus / "train.txt"], 400, "minilm", cache) != first
    assert train_tokenizer([copy_corpus / "valid.txt"], 300, "minilm", cache) != first
    trained = check_tokenizer(load_tokenizer(str(first), "tokenizer"), "first")
    assert 200 < len(trained) <= 300 and trained.mask_token == "[MASK]"
    assert not (first / "config.json").exists()  # a tokenizer folder, no model config: accepted above


def test_bad_tokenizers_are_refused_in_one_line(copy_corpus, tmp_path):
    with pytest.raises(ConfigError, match=r"^vocab.size: 20 is too small"):
        train_tokenizer([copy_corpus / "train.txt"], 20, "minilm", tmp_path)
    with pytest.raises(ConfigError, match=r"^tokenizer: .*nowhere"):
        load_tokenizer(str(tmp_path / "nowhere"), "tokenizer")
    no_mask = load_tokenizer("minilm")
    no_mask.mask_token = None
    with pytest.raises(ConfigError, match=r"^tokenizer: bare has no mask_token"):
        check_tokenizer(no_mask, "bare")
    proc = pretrain_cli(tmp_path / "run", copy_corpus, "tokenizer=train", "vocab.size=50", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: vocab.size: 50")
