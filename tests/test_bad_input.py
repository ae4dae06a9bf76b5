"""Every bad input rbert can attribute to the user: one ``error:`` line naming the option, file
or row at fault, exit status 2, no traceback.

Table-driven, one case a row. Like every run.py test, the rows call ``run.py``'s ``main`` in this process
(a subprocess per row would spend most of the suite's time importing torch); a sample of
rows also runs ``run.py`` in a subprocess, as a user meets them.
(Checkpoint payloads and foreign targets: test_safety.py; missing files and folders:
test_run.py.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.glue_files import write_task
from tests.test_pretrain import pretrain_cli
from tests.test_run import run_cli

# (overrides, the text the error line must contain); the fine-tuning config, tiny backbone, glue_dir.
FINE_TUNING = [
    (["data.batch_size=0"], "data.batch_size and data.eval_batch_size must be >= 1"),
    (["data.eval_batch_size=-1"], "data.batch_size and data.eval_batch_size must be >= 1"),
    (["data.max_length=2"], "data.max_length must be at least 8"),
    (["data.train_limit=0"], "data.train_limit must be >= 1"),
    (["model.optimizer.lr=0"], "model.optimizer.lr must be > 0"),
    (["model.optimizer.lr=-1e-3"], "model.optimizer.lr must be > 0"),
    (["model.warmup_ratio=1.5"], "model.warmup_ratio must lie in [0, 1)"),
    (["model.net.exit_layers=[0,9]"], "model.net.exit_layers must lie in 1..4"),
    (["model.net.pooling=max"], "model.net.pooling: unknown pooling 'max'"),
    (["model=bert", "model.net.pooling=max"], "model.net.pooling: unknown pooling 'max'"),
    (["model.gamma=2"], "model.gamma must lie in [0, 1]"),
    (["model.temperature=0"], "model.temperature be > 0"),
    (["model=deebert", "model.stage_epochs=[1]"], "model.stage_epochs must give two epoch counts"),
    (["model=deebert", "model.stage_epochs=[0,1]"], "give model.init_from"),
    (["task.labels=[0,0]"], "task sst2: task.labels ['0', '0'] name a label twice"),
    (["mode=pretrain"], "mode=pretrain needs --config-name pretrain"),
    (["mode=nope"], "mode: unknown mode 'nope'"),
]

# The same for the pre-training config (tiny arch, text_dir).
PRE_TRAINING = [
    (["data.max_seq_len=4"], "data.max_seq_len must be at least 8"),
    (["data.max_seq_len=1024"], "data.max_seq_len=1024 exceeds the model's max_position_embeddings=128"),
    (["data.mlm_probability=1.5"], "data.mlm_probability must lie in (0, 1)"),
    (["data.batch_size=0"], "data.batch_size and data.eval_batch_size must be >= 1"),
    (["~data.files.val"], "data.files: needs 'train' and 'val'"),
    (["model.optimizer.lr=0"], "model.optimizer.lr must be > 0"),
    (["arch.num_attention_heads=3"], "model.net: hidden_size 32 is not a multiple of num_attention_heads 3"),
    (["+arch.hidden_sise=64"], "arch: unknown BertConfig field(s) ['hidden_sise']"),
    (["model=core", "model.switch=0"], "model.switch=0: the switch must fall inside the budget"),
    (["model=core", "model.switch=20", "trainer.max_steps=20"], "model.switch=20: the switch must fall inside"),
    (["model=core", "model.net.ffn_rank=1000"], "model.net.ffn_rank=1000 must lie in 1..32"),
    (["model=core", "model.net.attention=softmax", "model.net.feed_forward=dense", "model.net.ffn_rank=null"],
     "model=core: model.net is a standard BERT"),
    (["model=core", "model.rewarmup_steps=-2"], "model.rewarmup_steps=-2 must not be negative"),
    (["mode=export"], "mode=export needs ckpt_path"),
    (["mode=train"], "mode=train needs the default config"),
]


def assert_one_error_line(code: int, err: str, expected: str) -> None:
    assert code == 2, f"exit {code}:\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], err[-3000:]


def check(proc, expected: str) -> None:
    assert_one_error_line(proc.returncode, proc.stderr, expected)


@pytest.mark.parametrize(("overrides", "expected"), FINE_TUNING, ids=[" ".join(o) for o, _ in FINE_TUNING])
def test_fine_tuning_input(overrides, expected, glue_dir, tmp_path):
    check(run_cli(tmp_path / "run", f"data_dir={glue_dir}", *overrides, check=False), expected)


@pytest.mark.parametrize(("overrides", "expected"), PRE_TRAINING, ids=[" ".join(o) for o, _ in PRE_TRAINING])
def test_pre_training_input(overrides, expected, text_dir, tmp_path):
    check(pretrain_cli(tmp_path / "run", text_dir, *overrides, check=False), expected)


@pytest.mark.parametrize("case", [7])  # exit layers
def test_fine_tuning_input_in_a_subprocess(case, glue_dir, tmp_path):
    overrides, expected = FINE_TUNING[case]
    check(run_cli(tmp_path / "run", f"data_dir={glue_dir}", *overrides, check=False, isolated=True), expected)


@pytest.mark.parametrize("case", [1])  # a setting checked against the model
def test_pre_training_input_in_a_subprocess(case, text_dir, tmp_path):
    overrides, expected = PRE_TRAINING[case]
    check(pretrain_cli(tmp_path / "run", text_dir, *overrides, check=False, isolated=True), expected)


# ---------------------------------------------------------------------------- rows
@pytest.fixture
def sst2_with_empty_rows(tmp_path) -> Path:
    root = tmp_path / "glue"
    folder = write_task(root, "sst2")
    for name, row in (("train.tsv", 5), ("dev.tsv", 7)):
        lines = (folder / name).read_text().splitlines(keepends=True)
        lines[row] = "   \t1\n"  # whitespace-only sentence
        (folder / name).write_text("".join(lines))
    return root


def test_an_empty_evaluation_row_is_an_error_naming_file_and_row(sst2_with_empty_rows, tmp_path):
    proc = run_cli(tmp_path / "run", "task=sst2", f"data_dir={sst2_with_empty_rows}", check=False)
    check(proc, "dev.tsv: row 7: empty text")


def test_empty_training_rows_are_skipped_and_counted(sst2_with_empty_rows, tmp_path):
    dev = sst2_with_empty_rows / "SST-2" / "dev.tsv"
    shutil.copy(write_task(tmp_path / "clean", "sst2") / "dev.tsv", dev)  # a clean dev file
    proc = run_cli(tmp_path / "run", "task=sst2", f"data_dir={sst2_with_empty_rows}", "debug=limit")
    assert "train.tsv: skipped 1 training row(s) with an empty text (rows 5)" in proc.stdout + proc.stderr


def test_a_label_outside_the_task_is_an_error_naming_its_row(tmp_path, glue_dir):
    root = tmp_path / "glue"
    folder = write_task(root, "sst2")
    lines = (folder / "train.tsv").read_text().splitlines(keepends=True)
    lines[3] = lines[3].rsplit("\t", 1)[0] + "\t7\n"
    (folder / "train.tsv").write_text("".join(lines))
    proc = run_cli(tmp_path / "run", "task=sst2", f"data_dir={root}", check=False)
    check(proc, "train.tsv: row 3: label 7 is not one of task sst2's labels")


# ---------------------------------------------------------------------------- checkpoints
def test_a_checkpoint_of_another_model_or_size_is_refused(glue_dir, text_dir, tmp_path):
    run_cli(tmp_path / "bert", f"data_dir={glue_dir}", "model=bert", "debug=limit", "test=false")
    ckpt = tmp_path / "bert" / "checkpoints" / "last.ckpt"
    for extra in (["train=false"], []):  # test only, and resume
        proc = run_cli(tmp_path / "other", f"data_dir={glue_dir}", "model=romebert", f"ckpt_path={ckpt}", *extra,
                       check=False)
        check(proc, f"ckpt_path: {ckpt} does not fit this run's model")
        assert "model=rbert.systems.SequenceClassifier" in proc.stderr
    pretrain_cli(tmp_path / "tiny", text_dir, "trainer.max_steps=2", "trainer.val_check_interval=2",
                 "export_dir=null")
    ckpt = tmp_path / "tiny" / "checkpoints" / "last.ckpt"
    proc = pretrain_cli(tmp_path / "wider", text_dir, f"ckpt_path={ckpt}", "arch.hidden_size=64", check=False)
    check(proc, f"ckpt_path: {ckpt} does not fit this run's model")
    assert "[32] there, [64] here" in proc.stderr
