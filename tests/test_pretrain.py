"""Masked-LM pre-training: packing, masking, the HF-compatible MLM model, resume, run.py end to end."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from transformers import BertConfig

from rbert.data.resume import ResumableSampler
from rbert.data.text import MaskingCollator, TextDataModule, pack_lines
from rbert.errors import ConfigError
from rbert.models import BertForMaskedLM, load_encoder, load_tokenizer
from rbert.models.mlm import IGNORE_INDEX
from tests.conftest import SHARED_TEXT
from tests.test_run import run_cli

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("minilm")


def tiny_mlm(dropout: float = 0.1) -> BertForMaskedLM:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout)
    return BertForMaskedLM(config)


# ---------------------------------------------------------------------------- packing and masking
def test_packing_fills_blocks_and_marks_documents(tokenizer):
    lines = ["one two three four five six", "seven eight nine", "", "ten eleven twelve thirteen", "", "",
             "fourteen fifteen sixteen seventeen eighteen nineteen twenty"]
    blocks = pack_lines(lines, tokenizer, max_seq_len=8)
    assert blocks and all(len(b) == 8 for b in blocks)
    assert all(b[0] == tokenizer.cls_token_id and b[-1] == tokenizer.sep_token_id for b in blocks)
    stream = [t for b in blocks for t in b[1:-1]]
    expected = (tokenizer(lines[0] + " " + lines[1], add_special_tokens=False)["input_ids"] + [tokenizer.sep_token_id]
                + tokenizer(lines[3], add_special_tokens=False)["input_ids"] + [tokenizer.sep_token_id]
                + tokenizer(lines[6], add_special_tokens=False)["input_ids"])
    # Blocks hold the token stream in order, one [SEP] per document boundary (however many
    # blank lines), the tail that fills no block dropped.
    assert stream == expected[:len(stream)] and len(expected) - len(stream) < 6


def test_masking_statistics(tokenizer):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (256, 128), generator=g)
    ids[:, 0], ids[:, -1] = tokenizer.cls_token_id, tokenizer.sep_token_id
    items = [((0, i), row.numpy()) for i, row in enumerate(ids)]
    batch = MaskingCollator(tokenizer, 0.15, seed=1)(items)
    selected = batch["labels"] != IGNORE_INDEX
    assert not selected[:, [0, -1]].any()  # special tokens are never selected
    assert torch.equal(batch["labels"][selected], ids[selected])
    share = selected[:, 1:-1].float().mean().item()
    assert 0.14 < share < 0.16
    masked = batch["input_ids"][selected]
    as_mask = (masked == tokenizer.mask_token_id).float().mean().item()
    unchanged = (masked == ids[selected]).float().mean().item()
    assert 0.78 < as_mask < 0.82
    assert 0.08 < unchanged < 0.12  # plus the rare random draw of the same token
    assert 0.08 < 1 - as_mask - unchanged < 0.12  # a random token
    assert torch.equal(batch["input_ids"][~selected], ids[~selected])


def test_training_masks_are_fresh_and_validation_masks_fixed(tokenizer):
    rows = [torch.randint(1000, 30000, (32,)).numpy() for _ in range(8)]
    train = MaskingCollator(tokenizer, 0.15, seed=1)
    epoch0 = [((0, i), row) for i, row in enumerate(rows)]
    a, again = train(epoch0[:4]), train(epoch0[:4])
    assert torch.equal(a["labels"], again["labels"])  # a function of the data: resumes mask alike
    # A block masks the same in any batch (another batch size, another DDP rank's share)...
    whole, halves = train(epoch0), [train(epoch0[:3]), train(epoch0[3:])]
    assert torch.equal(whole["labels"], torch.cat([h["labels"] for h in halves]))
    assert torch.equal(train(epoch0[:4][::-1])["labels"].flip(0), a["labels"])
    # ... and afresh in the next epoch.
    epoch1 = train([((1, i), row) for i, row in enumerate(rows[:4])])
    assert not torch.equal(epoch1["labels"] != IGNORE_INDEX, a["labels"] != IGNORE_INDEX)
    fixed = MaskingCollator(tokenizer, 0.15, seed=0)
    val = [((i,), row) for i, row in enumerate(rows)]
    assert torch.equal(fixed(val)["labels"], torch.cat([fixed(val[:3])["labels"], fixed(val[3:])["labels"]]))


def test_resumable_sampler_skips_consumed_batches():
    data = list(range(40))
    full = list(ResumableSampler(data, batch_size=4, seed=3))
    assert sorted(full) == data and full != data  # shuffled
    resumed = ResumableSampler(data, batch_size=4, seed=3, resume_epoch=0, resume_batches=3)
    assert list(resumed) == full[12:]
    resumed.set_epoch(1)  # later epochs are whole
    fresh = ResumableSampler(data, batch_size=4, seed=3)
    fresh.set_epoch(1)
    assert list(resumed) == list(fresh)
    ranks = [list(ResumableSampler(data, 4, 3, num_replicas=2, rank=r, resume_epoch=0, resume_batches=2))
             for r in (0, 1)]
    assert all(len(r) == 20 - 8 for r in ranks) and not set(ranks[0]) & set(ranks[1])


def test_text_datamodule_reads_files_and_a_dataset_folder(text_dir, tmp_path):
    common = dict(tokenizer="minilm", max_seq_len=32, batch_size=4, cache_dir=str(tmp_path / "cache"))
    local = TextDataModule(data_dir=str(text_dir), files={"train": "train.txt", "val": "valid.txt"}, **common)
    local.setup("fit")
    batch = next(iter(local.train_dataloader()))
    assert batch["input_ids"].shape == (4, 32) and (batch["labels"] != IGNORE_INDEX).any()
    # The hub path (datasets.load_dataset(path, name, split)) on a local dataset folder.
    folder = tmp_path / "corpus"
    folder.mkdir()
    for split, name in (("train", "train.txt"), ("validation", "valid.txt")):
        lines = (text_dir / name).read_text().splitlines()
        (folder / f"{split}.jsonl").write_text("".join(json.dumps({"content": line}) + "\n" for line in lines))
    hub = TextDataModule(hub={"path": str(folder), "text_column": "content",
                              "splits": {"train": "train", "val": "validation"}}, **common)
    hub.setup("fit")
    for split in ("train", "val"):
        assert hub.splits[split]["input_ids"] == local.splits[split]["input_ids"]


# ---------------------------------------------------------------------------- the model
def test_hf_round_trip(tmp_path):
    ours = tiny_mlm().eval()
    ours.save_pretrained(tmp_path / "hf")
    hf = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    assert isinstance(hf, transformers.BertForMaskedLM)
    ids = torch.randint(0, 120, (3, 16))
    mask = torch.ones_like(ids)
    mask[0, 10:] = 0
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, mask).logits, hf(ids, attention_mask=mask).logits, atol=1e-4, rtol=0)
    # ... and back: an HF MLM checkpoint loads into rbert's by name, decoder still tied.
    back = BertForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    assert back.cls.predictions.decoder.weight is back.bert.embeddings.word_embeddings.weight
    with torch.no_grad():
        torch.testing.assert_close(back(ids, mask).logits, ours(ids, mask).logits, atol=1e-5, rtol=0)


def test_mlm_folder_as_backbone_says_what_it_skips_in_one_line(tmp_path, caplog):
    """An MLM folder as a classifier's encoder: the MLM head is unused and the pooler is new;
    rbert logs that in two short lines instead of transformers' many-line load report."""
    tiny_mlm().save_pretrained(tmp_path / "hf")
    with caplog.at_level("INFO"):
        encoder = load_encoder(str(tmp_path / "hf"))
    lines = [r.getMessage() for r in caplog.records if r.levelno >= 20]
    assert any(line.endswith("not used: cls.predictions.*") for line in lines), lines
    assert any(line.endswith("initialised at random: pooler.dense.*") for line in lines), lines
    assert not any("LOAD REPORT" in line for line in lines)
    assert encoder.embeddings.word_embeddings.weight.shape[0] == 120
    # A folder whose weights do not fit its config still fails (with transformers' report).
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    with pytest.raises(ConfigError, match="weights do not fit its config.json"):
        load_encoder(str(tmp_path / "hf"))


def test_masked_only_decoding_equals_full_decoding():
    model = tiny_mlm(dropout=0.0).eval()
    ids = torch.randint(5, 120, (4, 20))
    labels = torch.full_like(ids, IGNORE_INDEX)
    chosen = torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) < 0.2
    labels[chosen] = ids[chosen]
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids, labels=labels)
    torch.testing.assert_close(out.logits, full[chosen], atol=1e-5, rtol=0)
    expected = torch.nn.functional.cross_entropy(full.view(-1, 120), labels.view(-1), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out.loss, expected)


# ---------------------------------------------------------------------------- run.py
def pretrain_cli(run_dir: Path, text_dir: Path, *overrides: str, check: bool = True,
                 isolated: bool = False) -> subprocess.CompletedProcess:
    return run_cli(run_dir, "arch=tiny", f"data_dir={text_dir}", "data.max_seq_len=32", "data.batch_size=4",
                   *overrides, check=check, backbone=False, config="pretrain", isolated=isolated)


NO_DROPOUT = ["+arch.hidden_dropout_prob=0", "+arch.attention_probs_dropout_prob=0"]
KEEP_STEPS = ["callbacks.step_checkpoint.every_n_train_steps=3", "callbacks.step_checkpoint.save_top_k=-1",
              "+callbacks.step_checkpoint.auto_insert_metric_name=false",
              "+callbacks.step_checkpoint.filename='step{step}'"]


def test_pretrain_exports_a_backbone_that_fine_tunes(text_dir, glue_dir, tmp_path):
    proc = pretrain_cli(tmp_path / "pre", text_dir, "trainer.max_steps=12", "trainer.val_check_interval=6",
                        "trainer.log_every_n_steps=2",
                        "+data.files.val_wikitext2=wikitext-2/valid.txt")
    res = json.loads((tmp_path / "pre" / "results.json").read_text())
    assert {"val/loss", "val/perplexity", "val/accuracy", "val_wikitext2/loss"} <= set(res["final"])
    assert res["steps"] == 12 and res["train_seconds"] > 0
    assert "val_wikitext2" in proc.stdout  # the result table
    with open(tmp_path / "pre" / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert {"val/loss", "time/train_seconds", "train/loss"} <= set(rows[0])
    logged_losses = [float(r["val/loss"]) for r in rows if r["val/loss"]]
    assert len(logged_losses) == 2  # steps 6 and 12; the final weights are not validated twice
    # The best checkpoint is chosen on the MLM loss, downwards.
    best = torch.load(tmp_path / "pre" / "checkpoints" / "best.ckpt", weights_only=True)
    state = next(v for k, v in best["callbacks"].items() if k.startswith("ModelCheckpoint") and v["monitor"])
    assert state["monitor"] == "val/loss" and float(state["best_model_score"]) == pytest.approx(min(logged_losses))
    hf = tmp_path / "pre" / "hf"
    assert transformers.AutoModelForMaskedLM.from_pretrained(hf).config.num_hidden_layers == 2
    # The from-scratch baseline of that backbone: its shape and vocabulary, random weights.
    trained, scratch = load_encoder(str(hf)), load_encoder(str(hf), pretrained=False)
    shape = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    assert all(getattr(scratch.config, k) == getattr(trained.config, k) for k in shape)
    assert not torch.equal(scratch.embeddings.word_embeddings.weight, trained.embeddings.word_embeddings.weight)
    run_cli(tmp_path / "ft", f"backbone={hf}", "task=sst2", "model=romebert", f"data_dir={glue_dir}", "debug=limit",
            backbone=False)
    assert "test/exit_2/accuracy" in json.loads((tmp_path / "ft" / "results.json").read_text())["test"]


def test_resume_mid_epoch_gives_the_same_weights(text_dir, tmp_path):
    # The tiny corpus packs into ~9 batches of 8 blocks an epoch: step 6 is mid-epoch 0, and
    # the resumed run goes on into epoch 1 (which must start whole).
    common = [*NO_DROPOUT, "data.batch_size=8", "trainer.max_steps=14", "trainer.val_check_interval=4",
              "export_dir=null", "logger=none"]
    pretrain_cli(tmp_path / "whole", text_dir, *common, *KEEP_STEPS)
    step6 = tmp_path / "whole" / "checkpoints" / "step6.ckpt"
    assert torch.load(step6, weights_only=True)["TextDataModule"] == {"epoch": 0, "batches": 6, "epoch_offset": 0,
                                                                      "carry": [-1, 0]}
    assert torch.load(tmp_path / "whole" / "checkpoints" / "step12.ckpt", weights_only=True)["epoch"] == 1
    pretrain_cli(tmp_path / "resumed", text_dir, *common, f"ckpt_path={step6}")
    whole = torch.load(tmp_path / "whole" / "checkpoints" / "last.ckpt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == whole["global_step"] == 14
    for key, value in whole["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=0, atol=1e-6)


def test_sigterm_writes_a_checkpoint_to_resume_from(text_dir, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "run.py", "--config-name", "pretrain", "arch=tiny", f"data_dir={text_dir}",
           "data.max_seq_len=32", "data.batch_size=4", "trainer.max_steps=100000", "trainer.val_check_interval=2",
           "callbacks.step_checkpoint.every_n_train_steps=2", "logger=none", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert last.exists(), proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert "SIGTERM: checkpoint written" in out + err, (out + err)[-3000:]
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] > 0 and ckpt["TextDataModule"]["batches"] > 0


@pytest.mark.slow
def test_real_text_packs_and_masks(tmp_path):
    if not SHARED_TEXT.is_dir():
        pytest.skip(f"real text not found at {SHARED_TEXT}")
    dm = TextDataModule(data_dir=str(SHARED_TEXT), files={"train": "valid.txt", "val": "wikitext-2/valid.txt"},
                        cache_dir=str(tmp_path))
    dm.setup("fit")
    assert len(dm.splits["train"]) > 500 and len(dm.splits["val"]) > 1500
    batch = next(iter(dm.val_dataloader()[0]))
    assert 0.13 < (batch["labels"] != IGNORE_INDEX).float().mean() < 0.17


def test_stages_can_be_counted_in_steps():
    from rbert.systems import MaskedLM

    class TwoPhases(MaskedLM):
        stage_steps = [30, 20]

    system = TwoPhases(tiny_mlm(), torch.optim.AdamW)
    assert system.num_stages == 2
    assert system.stage_overrides(1) == {"max_steps": 20, "max_epochs": -1}
    assert system.monitor() == ("val/loss", "min")
