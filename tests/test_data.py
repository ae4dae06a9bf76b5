"""Reading GLUE (and custom) files as real GLUE files are, and failing clearly on bad input."""

from __future__ import annotations

import json
import shutil

import datasets
import pytest
import torch

from rbert.data import GlueDataModule
from rbert.errors import ConfigError
from tests.conftest import task_spec
from tests.glue_files import GLUE_TASKS


def datamodule(task, data_dir, **kw) -> GlueDataModule:
    dm = GlueDataModule(task, backbone="tiny", data_dir=str(data_dir) if data_dir else None, batch_size=8, **kw)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_evaluation_alone_does_not_tokenise_the_training_split(glue_dir):
    dm = GlueDataModule(task_spec("mnli"), backbone="tiny", data_dir=str(glue_dir), train_limit=10)
    dm.setup("validate")
    assert sorted(dm.splits) == ["val", "val_mm"]
    dm.setup("fit")  # training later still gets its (limited) split
    assert len(dm.splits["train"]) == 10


@pytest.mark.parametrize("name", GLUE_TASKS)
def test_every_glue_task_loads(name, glue_dir):
    task = task_spec(name)
    dm = datamodule(task, glue_dir)
    assert len(dm.splits["train"]) == 64
    assert [len(dl.dataset) for dl in dm.val_dataloader()] == ([32, 16] if name == "mnli" else [32])
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    # Padding is per batch: the longest row of the batch has no padding.
    assert batch["attention_mask"][:, -1].any()
    labels = torch.cat([b["labels"] for b in dm.train_dataloader()])
    if task.is_regression:
        assert labels.dtype == torch.float32 and labels.unique().numel() > 10
        assert labels.min() >= 0 and labels.max() <= 5
    else:
        assert labels.dtype == torch.int64
        assert sorted(labels.unique().tolist()) == list(range(task.num_labels))
    if len(task.text_fields) == 2:  # sentence pairs get segment ids 0 and 1
        assert batch["token_type_ids"].max() == 1


def test_quirks_of_real_glue_files(glue_dir):
    # CoLA has no header row: the first line is data.
    cola = datamodule(task_spec("cola"), glue_dir)
    assert len(cola.splits["train"]) == 64
    first = (glue_dir / "CoLA" / "train.tsv").read_text().splitlines()[0].split("\t")[3]
    assert cola.tokenizer.decode(cola.splits["train"][0]["input_ids"], skip_special_tokens=True) == first
    # Unbalanced quotes and "NA" stay text (the rows are all there, with their words).
    sst2 = datamodule(task_spec("sst2"), glue_dir)
    decoded = [sst2.tokenizer.decode(r["input_ids"], skip_special_tokens=True) for r in sst2.splits["train"]]
    assert any('" quoted' in d for d in decoded) and any(" na " in f" {d} " for d in decoded)
    # MNLI: matched and mismatched dev sets, logged and tested under their own names.
    mnli = task_spec("mnli")
    assert mnli.prefixes("val") == ["val", "val_mm"] and mnli.prefixes("test") == ["test", "test_mm"]


def test_data_dir_may_name_the_task_folder(glue_dir):
    dm = datamodule(task_spec("rte"), glue_dir / "RTE")
    assert len(dm.splits["train"]) == 64


def test_train_limit_takes_a_fixed_random_subset(glue_dir):
    a = datamodule(task_spec("sst2"), glue_dir, train_limit=10, seed=1)
    b = datamodule(task_spec("sst2"), glue_dir, train_limit=10, seed=1)
    c = datamodule(task_spec("sst2"), glue_dir, train_limit=10, seed=2)
    assert len(a.splits["train"]) == 10
    assert a.splits["train"]["input_ids"] == b.splits["train"]["input_ids"] != c.splits["train"]["input_ids"]


def test_tokenised_data_is_cached(glue_dir):
    task = task_spec("wnli")
    first = datamodule(task, glue_dir).splits["train"]
    second = datamodule(task, glue_dir).splits["train"]
    assert first._fingerprint == second._fingerprint
    assert first.cache_files and first.cache_files == second.cache_files
    longer = datamodule(task, glue_dir, max_length=16).splits["train"]
    assert longer._fingerprint != first._fingerprint


def test_custom_task_from_csv_and_jsonl(tmp_path):
    rows = [("a good one", "pos"), ("so bad", "neg"), ("fine, I guess", "mid")] * 4
    (tmp_path / "train.csv").write_text("text,y\n" + "".join(f'"{t}",{y}\n' for t, y in rows))
    (tmp_path / "dev.jsonl").write_text("".join(json.dumps({"text": t, "y": y}) + "\n" for t, y in rows[:3]))
    task = task_spec("custom", text_fields=["text"], label_field="y", num_labels=3,
                     splits={"train": "train.csv", "val": "dev.jsonl"})
    dm = datamodule(task, tmp_path)
    assert task.labels == ["mid", "neg", "pos"]  # read from the training file, sorted
    assert dm.splits["val"]["labels"] == [2, 1, 0]
    assert len(dm.splits["train"]) == 12


def test_custom_regression_task(tmp_path):
    (tmp_path / "train.tsv").write_text("s\tscore\nhello\t0.5\nworld\t2\n")
    (tmp_path / "dev.tsv").write_text("s\tscore\nhi\t1.25\n")
    task = task_spec("custom", text_fields=["s"], label_field="score", num_labels=1, metrics=["pearson"],
                     monitor="pearson", splits={"train": "train.tsv", "val": "dev.tsv"})
    assert datamodule(task, tmp_path).splits["train"]["labels"] == [0.5, 2.0]


def test_hub_path_when_no_data_dir(monkeypatch):
    """Without data_dir the task comes from the hub via datasets.load_dataset (faked here: no network)."""
    calls = []
    features = datasets.Features({"sentence": datasets.Value("string"), "idx": datasets.Value("int32"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return datasets.Dataset.from_dict({"sentence": ["good", "bad"], "idx": [0, 1], "label": [1, 0]}, features)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dm = datamodule(task_spec("sst2"), None)
    assert ("nyu-mll/glue", "sst2", "train") in calls and ("nyu-mll/glue", "sst2", "validation") in calls
    assert dm.splits["train"]["labels"] == [1, 0]


def test_hub_failure_says_to_set_data_dir(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConfigError, match="set data_dir or RBERT_DATA_DIR"):
        datamodule(task_spec("sst2"), None)


def test_bad_input_errors_name_the_culprit(glue_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"data_dir: .*nowhere is not a folder"):
        datamodule(task_spec("sst2"), tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="has no QNLI folder"):
        datamodule(task_spec("qnli"), tmp_path)

    broken = tmp_path / "glue"
    shutil.copytree(glue_dir / "SST-2", broken / "SST-2")
    (broken / "SST-2" / "dev.tsv").unlink()
    with pytest.raises(ConfigError, match=r"dev.tsv: missing val split of task sst2"):
        datamodule(task_spec("sst2"), broken)

    (broken / "SST-2" / "dev.tsv").write_text("text\tlabel\nfine\t1\n")
    with pytest.raises(ConfigError, match=r"dev.tsv: missing column 'sentence'"):
        datamodule(task_spec("sst2"), broken)

    (broken / "SST-2" / "dev.tsv").write_text("sentence\tlabel\nfine\t1\nodd\t7\n")
    with pytest.raises(ConfigError, match=r"dev.tsv: row 2: label 7 is not one of task sst2's labels"):
        datamodule(task_spec("sst2"), broken)


@pytest.mark.slow
def test_real_glue_files(shared_glue):
    """The shared GLUE copies load with the row counts of their README."""
    expected = {"sst2": (67349, 872), "mrpc": (3668, 408), "cola": (8551, 1043), "stsb": (5749, 1500),
                "wnli": (635, 71)}
    for name, (n_train, n_dev) in expected.items():
        dm = GlueDataModule(task_spec(name), backbone="minilm", data_dir=str(shared_glue))
        dm.setup()
        assert (len(dm.splits["train"]), len(dm.splits["val"])) == (n_train, n_dev), name
