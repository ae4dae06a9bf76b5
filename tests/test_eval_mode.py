"""mode=eval and mode=predict end to end (tiny multi-exit checkpoint, tiny GLUE files)."""

from __future__ import annotations

import csv
import json
import time

import pytest

from rbert.inference.timing import time_in_turns
from tests.test_run import run_cli


@pytest.mark.parametrize("policy", ["entropy", "confidence", "patience", "fixed"])
def test_eval_sweeps_and_writes_table_csv_json_png(policy, romebert_ckpt, glue_dir, tmp_path):
    proc = run_cli(tmp_path / "ev", "mode=eval", f"ckpt_path={romebert_ckpt}", f"exit_policy={policy}",
                   f"data_dir={glue_dir}", "eval.timing_samples=8", "eval.timing_batches=1", "eval.batch_size=8")
    assert "forced exits" in proc.stdout and "measured_speedup_bs1" in proc.stdout
    summary = json.loads((tmp_path / "ev" / "eval.json").read_text())
    # Timing runs on bounded samples: 8 sentences at bs=1 and 1 batch of 8 (of 32 dev rows).
    assert (summary["timing_samples"], summary["timing_batches"], summary["batch_size"]) == (8, 1, 8)
    assert "sweep points: " in proc.stdout + proc.stderr  # the timing loop's progress line (no terminal here)
    assert [row["exit"] for row in summary["forced"]] == ["exit 1", "exit 2", "exit 3", "exit 4"]
    rows = summary["sweep"]
    assert len(rows) >= 4
    for row in rows:
        assert 1.0 <= row["mean_exit_layer"] <= 4.0
        assert row["layer_speedup"] == pytest.approx(4.0 / row["mean_exit_layer"])
        assert row["measured_speedup_bs1"] > 0 and row["measured_speedup_batched"] > 0
    with open(tmp_path / "ev" / "sweep.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert (tmp_path / "ev" / "sweep.png").stat().st_size > 1000
    if policy == "fixed":  # the per-layer curve: exit k for every sample is exit k's forced metric
        for row, forced in zip(rows, summary["forced"][: len(rows)]):
            assert row["accuracy"] == pytest.approx(forced["accuracy"])


def test_eval_consults_only_the_chosen_exits(romebert_ckpt, glue_dir, tmp_path):
    run_cli(tmp_path / "ev", "mode=eval", f"ckpt_path={romebert_ckpt}", "exit_policy=fixed", "eval.exit_layers=[2]",
            f"data_dir={glue_dir}", "eval.timing_samples=4")
    summary = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert summary["exit_layers"] == [2, 4] and summary["trained_exits"] == [1, 2, 3, 4]
    # "leave at layer 1 or 2" both answer at exit 2; any later layer at the final exit
    for row in summary["sweep"]:
        assert row["mean_exit_layer"] == (2.0 if row["threshold"] <= 2 else 4.0)


def test_budget_reports_what_it_reached(romebert_ckpt, glue_dir, tmp_path):
    run_cli(tmp_path / "ev", "mode=eval", f"ckpt_path={romebert_ckpt}", "exit_policy=budget",
            "exit_policy.max_drop=1.0", f"data_dir={glue_dir}", "eval.timing_samples=4")
    budget = json.loads((tmp_path / "ev" / "eval.json").read_text())["budget"]
    assert budget["met"] and budget["drop"] <= 1.0 and budget["layer_speedup"] >= 1.0


def test_predict_writes_answers_with_exit_layers(romebert_ckpt, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("a good film\nthe plot is bad\nquite a long story very good\n")
    run_cli(tmp_path / "pr", "mode=predict", f"ckpt_path={romebert_ckpt}", f"predict.input={texts}",
            "exit_policy=entropy", "exit_policy.threshold=0.5")
    with open(tmp_path / "pr" / "predictions.tsv") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert [r["sentence"] for r in rows] == ["a good film", "the plot is bad", "quite a long story very good"]
    assert all(r["prediction"] in ("0", "1") and 1 <= int(r["exit_layer"]) <= 4 for r in rows)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["exit_policy=nope"], "Could not find 'exit_policy/nope'"),
        (["exit_policy=entropy", "exit_policy.threshold=1.5"], "normalised entropy threshold lies in [0, 1]"),
        (["exit_policy=entropy", "exit_policy.normalized=false", "exit_policy.threshold=0.9"],
         "every sample would leave at the first exit"),
        (["mode=nope"], "error: mode: unknown mode 'nope'"),
        (["eval.exit_layers=[2,9]"], "eval.exit_layers: no trained exit at layer(s) [9]"),
    ],
)
def test_eval_bad_input(overrides, message, romebert_ckpt, glue_dir, tmp_path):
    proc = run_cli(tmp_path / "ev", "mode=eval", f"ckpt_path={romebert_ckpt}", f"data_dir={glue_dir}", *overrides,
                   check=False)
    assert proc.returncode != 0 and message in proc.stderr


def test_exit_policy_on_single_exit_checkpoint_is_refused(glue_dir, tmp_path):
    run_cli(tmp_path / "bert", "model=bert", f"data_dir={glue_dir}", "debug=limit", "logger=none", "test=false")
    ckpt = tmp_path / "bert" / "checkpoints" / "last.ckpt"
    proc = run_cli(tmp_path / "ev", "mode=eval", f"ckpt_path={ckpt}", "exit_policy=entropy", f"data_dir={glue_dir}",
                   check=False)
    assert proc.returncode == 2 and "needs a multi-exit model" in proc.stderr
    run_cli(tmp_path / "ok", "mode=eval", f"ckpt_path={ckpt}", "exit_policy=none", f"data_dir={glue_dir}")
    assert json.loads((tmp_path / "ok" / "eval.json").read_text())["forced"][0]["exit"] == "exit 4"


def test_timing_keeps_each_items_best_and_takes_turns():
    """A slow spell spoils one item's time in one pass only; every call runs each item per pass."""
    log = []

    def call(name):
        def run(i):
            if name == "a" and i == 1 and ("a", 1) not in log:  # a stall in a's first pass on item 1
                time.sleep(0.2)
            log.append((name, i))
        return run

    seconds = time_in_turns({"a": call("a"), "b": call("b")}, count=3, repeats=2)
    assert set(seconds) == {"a", "b"} and seconds["a"] < 0.1
    assert log[:2] == [("a", 0), ("b", 0)]  # warm-ups
    # pass 1 in the order a, b; pass 2 in the order b, a: item by item
    assert log[2:8] == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    assert log[8:] == [("b", 0), ("a", 0), ("b", 1), ("a", 1), ("b", 2), ("a", 2)]


def test_eval_against_a_plain_reference_and_the_chance_flag(romebert_ckpt, glue_dir, tmp_path):
    """eval.reference: the plain model a user would deploy instead, scored and timed in the same
    turns; a final exit at chance level gets a flag instead of a speed-up."""
    common = [f"data_dir={glue_dir}", "data.batch_size=16", "data.train_limit=null", "logger=none", "test=false",
              "eval.after_train=false"]
    run_cli(tmp_path / "plain", "model=bert", "trainer.max_epochs=4", "model.optimizer.lr=2e-3", *common)
    plain = tmp_path / "plain" / "checkpoints" / "best.ckpt"
    timing = ["eval.timing_samples=4", "eval.timing_batches=1", "eval.batch_size=8"]
    run_cli(tmp_path / "ev", "mode=eval", f"ckpt_path={romebert_ckpt}", f"eval.reference={plain}",
            f"data_dir={glue_dir}", *timing)
    summary = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert summary["reference"]["checkpoint"] == str(plain)
    final = summary["forced"][-1]["accuracy"]
    for row in summary["sweep"]:
        assert row["drop_vs_plain"] == pytest.approx(100 * (summary["reference"]["accuracy"] - row["accuracy"]))
        assert row["speedup_vs_plain_bs1"] > 0 and row["speedup_vs_plain_batched"] > 0
    assert final > 0.6  # the tiny task is learnt: no chance flag
    proc = run_cli(tmp_path / "bad", "mode=eval", f"ckpt_path={romebert_ckpt}", f"eval.reference={romebert_ckpt}",
                   f"data_dir={glue_dir}", *timing, check=False)
    assert proc.returncode != 0 and "eval.reference" in proc.stderr + proc.stdout

    # lr 1e-9: the exits stay at their random initialisation, at chance on the balanced dev set.
    run_cli(tmp_path / "untrained", "model=romebert", "trainer.max_epochs=1", "model.optimizer.lr=1e-9", *common)
    proc = run_cli(tmp_path / "ev0", "mode=eval", f"ckpt_path={tmp_path / 'untrained' / 'checkpoints' / 'best.ckpt'}",
                   f"data_dir={glue_dir}", *timing)
    summary = json.loads((tmp_path / "ev0" / "eval.json").read_text())
    assert summary["at_chance"] is True and "sweep" not in summary
    assert "at chance level" in proc.stdout
