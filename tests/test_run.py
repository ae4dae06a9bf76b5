"""run.py end to end, as a user runs it (tiny random BERT, tiny GLUE files)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def run_cli(run_dir: Path, *overrides: str, check: bool = True, backbone: bool = True,
            config: str | None = None, isolated: bool = False) -> subprocess.CompletedProcess:
    """``python run.py`` (``--config-name config``), with the tiny random backbone unless ``backbone=False``.

    Runs ``run.main`` in this process (a new process spends ~10 s importing torch and Lightning
    before it does anything), or, with ``isolated`` or a DDP trainer, as a subprocess.
    """
    args = [*(["--config-name", config] if config else []), *(["backbone=tiny"] if backbone else []),
            *pinned_model(overrides, config), f"hydra.run.dir={run_dir}", *overrides]
    if isolated or any(o.startswith("trainer=ddp") for o in overrides):
        cmd = [sys.executable, "run.py", *args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    else:
        proc = run_in_process(args)
    if check and proc.returncode != 0:
        output = f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        raise AssertionError(f"run.py {' '.join(args)} failed ({proc.returncode}):\n{output}")
    return proc


def pinned_model(overrides, config: str | None) -> list[str]:
    """``model=romebert`` unless a model is given: the tests were written against that objective,
    whatever the default job's model is (test_configs checks the default itself)."""
    if config is None and not any(o.startswith("model=") for o in overrides):
        return ["model=romebert"]
    return []


def run_in_process(args: list[str]) -> subprocess.CompletedProcess:
    """``run.main`` with ``args`` as its command line, its output captured as a subprocess's would be."""
    import run

    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["run.py", "--config-path", str(REPO / "conf"), *args]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            run.main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = argv
    return subprocess.CompletedProcess(["run.py", *args], code, out.getvalue(), err.getvalue())


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


# A tiny BERT learns the tiny tasks' keyword rule in a few epochs at a high learning rate.
FAST = ["trainer.max_epochs=8", "model.optimizer.lr=2e-3", "data.batch_size=16", "data.train_limit=null"]


def test_trains_checkpoints_and_reports(glue_dir, tmp_path):
    proc = run_cli(tmp_path / "run", f"data_dir={glue_dir}", *FAST)
    res = results(tmp_path / "run")
    assert res["test"]["test/accuracy"] >= 0.9  # the keyword rule was learnt
    assert res["best_val"]["val/accuracy"] >= 0.9
    assert "test/accuracy" in proc.stdout and "final" in proc.stdout  # the result table
    # ... and what early exit buys on the dev set: the budget policy's point, measured.
    assert "early exit on the dev set, budget(entropy, drop<=1)" in proc.stdout
    assert "train steps: 32/32 (100%)" in proc.stdout + proc.stderr  # progress as log lines: no terminal
    early = res["early_exit"]
    assert early["drop"] <= 1.0 and early["layer_speedup"] >= 1.0 and early["measured_speedup_bs1"] > 0
    assert early["final"] == pytest.approx(res["test"]["test/accuracy"])
    assert res["objective"] == {"val/accuracy": res["best_val"]["val/accuracy"]}  # validation, not test
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "best.ckpt").is_file() and (ckpts / "last.ckpt").is_file()
    stored = torch.load(ckpts / "best.ckpt", map_location="cpu", weights_only=True)
    assert stored["rbert_config"]["task"]["name"] == "sst2"  # the run can be rebuilt from its checkpoint
    with open(tmp_path / "run" / "csv" / "metrics.csv") as f:
        logged = set(next(csv.reader(f)))
    assert {"train/loss", "train/lr", "val/accuracy", "val/loss"} <= logged


def test_resume_from_checkpoint(glue_dir, tmp_path):
    common = [f"data_dir={glue_dir}", "data.batch_size=16", "data.train_limit=null"]
    run_cli(tmp_path / "first", *common, "trainer.max_epochs=1", "test=false")
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    first = torch.load(last, map_location="cpu", weights_only=True)
    run_cli(tmp_path / "second", *common, "trainer.max_epochs=2", f"ckpt_path={last}", "test=false")
    second = torch.load(tmp_path / "second" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert second["epoch"] == first["epoch"] + 1  # one more epoch
    assert second["global_step"] == 2 * first["global_step"] == 8  # 64 rows / 16 per batch, twice
    # The optimiser and schedule went on from where they stopped.
    assert second["lr_schedulers"][0]["last_epoch"] == 8


def test_killed_run_resumes_to_the_same_weights(glue_dir, tmp_path):
    """kill -9 partway, resume from last.ckpt (mid-epoch): the same final weights as an uninterrupted run."""
    common = [f"data_dir={glue_dir}", "model=bert", "data.batch_size=8", "data.train_limit=null",
              "model.net.bert.dropout=0.0", "model.net.dropout=0.0", "trainer.max_epochs=12", "test=false",
              "callbacks.step_checkpoint.every_n_train_steps=3", "logger=none"]  # 8 batches an epoch
    run_cli(tmp_path / "whole", *common)
    killed = tmp_path / "killed"
    cmd = [sys.executable, "run.py", "backbone=tiny", f"hydra.run.dir={killed}", *common]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = killed / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and not last.exists():
        time.sleep(0.05)
    proc.kill()  # SIGKILL: no handler runs
    proc.wait()
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert 0 < ckpt["global_step"] < 96
    run_cli(tmp_path / "resumed", *common, f"ckpt_path={last}")
    whole = state(tmp_path / "whole" / "checkpoints" / "last.ckpt")
    resumed = state(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    for key, value in whole.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


def test_mnli_evaluates_matched_and_mismatched(glue_dir, tmp_path):
    run_cli(tmp_path / "run", "task=mnli", f"data_dir={glue_dir}", "debug=limit", "callbacks=none")
    assert {"test/accuracy", "test_mm/accuracy"} <= set(results(tmp_path / "run")["test"])


def test_stsb_regression(glue_dir, tmp_path):
    run_cli(tmp_path / "run", "task=stsb", f"data_dir={glue_dir}", "debug=limit")
    res = results(tmp_path / "run")["test"]
    assert {"test/pearson", "test/spearman", "test/loss"} <= set(res)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["task=nope"], "Could not find 'task/nope'"),
        (["model=nope"], "Could not find 'model/nope'"),
        (["data_dir={missing}"], "error: data_dir: {missing} is not a folder"),
        (["ckpt_path={garbage}"], "error: ckpt_path: {garbage} is not a readable PyTorch checkpoint"),
        (["ckpt_path={missing}"], "error: ckpt_path: {missing} does not exist"),
    ],
)
def test_bad_input_gives_one_clear_line(overrides, message, glue_dir, tmp_path):
    paths = {"missing": tmp_path / "missing", "garbage": tmp_path / "garbage.ckpt"}
    paths["garbage"].write_text("not a checkpoint")
    args = [o.format(**paths) for o in overrides]
    proc = run_cli(tmp_path / "run", f"data_dir={glue_dir}", *args, check=False)
    assert proc.returncode != 0
    assert message.format(**paths) in proc.stderr
    if message.startswith("error:"):
        assert proc.returncode == 2 and "Traceback" not in proc.stderr


def state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_deebert_stage2_leaves_backbone_and_final_exit_bit_for_bit(glue_dir, tmp_path):
    run_cli(tmp_path / "run", "model=deebert", f"data_dir={glue_dir}", "data.batch_size=16", "data.train_limit=null",
            "model.optimizer.lr=1e-3")
    ckpts = tmp_path / "run" / "checkpoints"
    before, after = state(ckpts / "stage1" / "last.ckpt"), state(ckpts / "stage2" / "last.ckpt")
    last_exit = max(int(k.split(".")[2]) for k in before if k.startswith("net.exits."))
    frozen = [k for k in before if k.startswith(("net.bert.", f"net.exits.{last_exit}."))]
    trained = [k for k in before if k.startswith("net.exits.") and k not in frozen]
    assert frozen and trained
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert all(not torch.equal(before[k], after[k]) for k in trained if k.endswith("classifier.weight"))
    table = results(tmp_path / "run")["test"]
    assert {f"test/exit_{i}/accuracy" for i in (1, 2, 3, 4)} <= set(table)

    # Stage 1's internal exits are untrained: the checkpoint says so and early exit refuses them.
    trained = {stage: torch.load(ckpts / stage / "last.ckpt", weights_only=True)["rbert_trained_exits"]
               for stage in ("stage1", "stage2")}
    assert trained == {"stage1": [4], "stage2": [1, 2, 3, 4]}
    proc = run_cli(tmp_path / "ev1", "mode=eval", f"ckpt_path={ckpts / 'stage1' / 'last.ckpt'}",
                   "exit_policy=entropy", f"data_dir={glue_dir}", check=False)
    assert proc.returncode == 2 and "needs a multi-exit model with trained internal exits" in proc.stderr
    run_cli(tmp_path / "ev1", "mode=eval", f"ckpt_path={ckpts / 'stage1' / 'last.ckpt'}", "exit_policy=none",
            f"data_dir={glue_dir}")
    forced = json.loads((tmp_path / "ev1" / "eval.json").read_text())["forced"]
    assert [row["exit"] for row in forced] == ["exit 1 (untrained)", "exit 2 (untrained)", "exit 3 (untrained)",
                                               "exit 4"]


def test_romebert_same_update_with_ddp_and_with_accumulation(glue_dir, tmp_path):
    """GR sees the same gradients in 2-process DDP, with accumulation, and in one big batch."""
    # SGD, so that weights differ as much as gradients do; seed 3 with gamma 0.5 makes the
    # first step's gradients conflict, so the projection (and its DDP averaging) is exercised.
    common = ["model=romebert", f"data_dir={glue_dir}", "data.shuffle=false", "data.train_limit=null",
              "model.net.bert.dropout=0.0", "model.net.dropout=0.0", "trainer.max_steps=3", "test=false",
              "model.optimizer._target_=torch.optim.SGD", "model.optimizer.lr=1.0", "seed=3", "model.gamma=0.5",
              "trainer.log_every_n_steps=1"]
    run_cli(tmp_path / "one", *common, "data.batch_size=8")
    run_cli(tmp_path / "accumulate", *common, "data.batch_size=4", "trainer.accumulate_grad_batches=2")
    run_cli(tmp_path / "ddp", *common, "data.batch_size=4", "trainer=ddp_cpu")
    for run in ("one", "accumulate", "ddp"):
        with open(tmp_path / run / "csv" / "metrics.csv") as f:
            projected = [row["train/gr_projected"] for row in csv.DictReader(f) if row.get("train/gr_projected")]
        assert projected[0] == "1.0", run
    one = state(tmp_path / "one" / "checkpoints" / "last.ckpt")
    for other in ("accumulate", "ddp"):
        theirs = state(tmp_path / other / "checkpoints" / "last.ckpt")
        for k, v in one.items():
            torch.testing.assert_close(theirs[k], v, rtol=1e-5, atol=1e-6, msg=lambda m, k=k, o=other: f"{o} {k}: {m}")


def test_romebert_mixed_precision_on_cpu(glue_dir, tmp_path):
    run_cli(tmp_path / "run", "model=romebert", f"data_dir={glue_dir}", "trainer.precision=bf16-mixed",
            "debug=limit", "trainer.log_every_n_steps=1")
    with open(tmp_path / "run" / "csv" / "metrics.csv") as f:
        angles = [float(r["train/gr_angle"]) for r in csv.DictReader(f) if r.get("train/gr_angle")]
    assert angles and all(0 <= a <= 180 for a in angles)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("model", ["bert", "romebert", "deebert"])
def test_gpu_amp(model, glue_dir, tmp_path):
    """fp16 with loss scaling on one GPU (GR unscales its own gradient with the same scale)."""
    run_cli(tmp_path / "run", f"model={model}", "trainer=amp", f"data_dir={glue_dir}", "debug=limit",
            "trainer.log_every_n_steps=1")
    res = results(tmp_path / "run")["test"]
    assert all(v == v for v in res.values())  # no NaN
