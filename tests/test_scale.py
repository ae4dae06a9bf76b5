"""Scale and tracking: DDP equals one process, DDP evaluation counts each sample once, sweeps
(jobs keep their settings, failures do not stop the rest, a summary), Optuna, torchrun, the
SLURM launcher config, ckpt_path=auto, and W&B offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.glue_files import write_task
from tests.test_configs import make_config
from tests.test_pretrain import NO_DROPOUT, pretrain_cli
from tests.test_run import REPO, pinned_model, results, run_cli, state
from tests.wandb_log import read_run

# SGD, so that weights differ as much as gradients do (Adam's first steps would hide it).
SGD = ["model.optimizer._target_=torch.optim.SGD", "model.optimizer.lr=1.0"]


def multirun(sweep_dir: Path, *overrides: str, config: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "run.py", "-m", *(["--config-name", config] if config else []),
           *pinned_model(overrides, config), f"hydra.sweep.dir={sweep_dir}", *overrides]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def assert_same_weights(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        torch.testing.assert_close(b[k], v, rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{what} {k}: {m}")


@pytest.fixture(scope="module")
def odd_glue(tmp_path_factory) -> Path:
    """SST-2 with an odd-sized dev set: two DDP ranks cannot split it evenly."""
    root = tmp_path_factory.mktemp("odd_glue")
    write_task(root, "sst2", n_train=64, n_dev=31)
    return root


@pytest.mark.parametrize("model", ["bert", "deebert", "pabee"])
def test_ddp_fine_tuning_equals_one_process_and_counts_each_dev_sample_once(model, odd_glue, tmp_path):
    """DeeBERT: across its stage switch too (a new fit with the backbone frozen). RomeBERT's
    gradient regularisation: tests/test_run.py."""
    budget = ["model.stage_epochs=[1,1]"] if model == "deebert" else ["trainer.max_steps=3"]
    common = [f"model={model}", f"data_dir={odd_glue}", "data.shuffle=false", "data.train_limit=null",
              "model.net.bert.dropout=0.0", "model.net.dropout=0.0", *budget, *SGD, "eval.after_train=false"]
    run_cli(tmp_path / "one", *common, "data.batch_size=8")
    run_cli(tmp_path / "ddp", *common, "data.batch_size=4", "trainer=ddp_cpu")
    last = "checkpoints/stage2/last.ckpt" if model == "deebert" else "checkpoints/last.ckpt"
    assert_same_weights(state(tmp_path / "one" / last), state(tmp_path / "ddp" / last), "ddp")
    # 31 dev samples over 2 ranks: 16 + 15, none repeated, so the metrics are those of one process.
    one, ddp = results(tmp_path / "one"), results(tmp_path / "ddp")
    for key in ("test/accuracy", "test/loss"):
        assert ddp["test"][key] == pytest.approx(one["test"][key], abs=1e-6), key
    assert ddp["objective"]["val/accuracy"] == pytest.approx(one["objective"]["val/accuracy"], abs=1e-6)


@pytest.mark.parametrize("model", ["bert_mlm", "core"])
def test_ddp_pretraining_equals_one_process(model, text_dir, tmp_path):
    """Ranks mask different numbers of tokens; the loss is the mean over all of them, as in one
    process. CoRe: across its phase switch (expansion, carried optimiser state) too."""
    common = [f"model={model}", *NO_DROPOUT, *SGD, "~model.optimizer.betas", "~model.optimizer.eps",
              "trainer.max_steps=4", "trainer.val_check_interval=2", "export_dir=null", "logger=none"]
    pretrain_cli(tmp_path / "one", text_dir, *common, "data.batch_size=8")
    pretrain_cli(tmp_path / "ddp", text_dir, *common, "data.batch_size=4", "trainer=ddp_cpu")
    last = "checkpoints/stage2/last.ckpt" if model == "core" else "checkpoints/last.ckpt"
    assert_same_weights(state(tmp_path / "one" / last), state(tmp_path / "ddp" / last), "ddp")
    one, ddp = (json.loads((tmp_path / r / "results.json").read_text())["final"] for r in ("one", "ddp"))
    assert ddp["val/loss"] == pytest.approx(one["val/loss"], abs=1e-5)


def test_sweep_jobs_keep_their_settings_under_ddp_and_failures_do_not_stop_it(glue_dir, tmp_path):
    sweep = tmp_path / "sweep"
    proc = multirun(sweep, "backbone=tiny", f"data_dir={glue_dir}", "trainer=ddp_cpu", "debug=limit",
                    "task=sst2,mrpc", "data.batch_size=0,8")
    assert proc.returncode == 1, proc.stderr[-3000:]  # two jobs failed: reported at the end, not at once
    jobs = {int(p.name): yaml.safe_load((p / ".hydra" / "overrides.yaml").read_text())
            for p in sweep.iterdir() if (p / ".hydra").is_dir()}
    assert len(jobs) == 4
    for num, overrides in jobs.items():
        folder = sweep / str(num)
        if "data.batch_size=0" in overrides:
            assert "data.batch_size" in json.loads((folder / "failed.json").read_text())["error"]
            continue
        task = next(o.split("=")[1] for o in overrides if o.startswith("task="))
        assert results(folder)["task"] == task  # this job's settings...
        assert "early_exit" in results(folder)  # (the after-training table: on rank 0 alone)
        assert (folder / "ddp_rank_1.log").is_file()  # ... and its DDP child ran this job, in this folder
    summary = json.loads((sweep / "summary.json").read_text())
    assert len(summary["configurations"]) == 4 and sum(c["failed"] for c in summary["configurations"]) == 2
    assert "sweep summary: 4 jobs" in proc.stdout and (sweep / "summary.csv").is_file()


def test_sweep_summary_averages_seeds_and_logs_one_wandb_run_per_job(glue_dir, tmp_path):
    sweep = tmp_path / "sweep"  # W&B offline (tests/conftest.py): each job's run under its folder
    proc = multirun(sweep, "backbone=tiny", f"data_dir={glue_dir}", "debug=limit", "logger=wandb", "seed=1,2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads((sweep / "summary.json").read_text())["configurations"]
    assert row["jobs"] == 2 and row["failed"] == 0
    accuracies = [results(sweep / str(i))["test"]["test/accuracy"] for i in (0, 1)]
    assert row["test/accuracy mean"] == pytest.approx(sum(accuracies) / 2)
    assert "val/accuracy mean" in row and "val/accuracy std" in row  # the objective, over seeds
    for i, seed in ((0, 1), (1, 2)):  # one offline run per job, finished, with that job's config
        run = read_run(sweep / str(i))
        assert run["config"]["seed"] == seed and run["config"]["model"]["_target_"] == "rbert.systems.RomeBERT"
        assert {"test/accuracy", "early_exit/layer_speedup", "early_exit/measured_speedup_bs1"} <= set(run["summary"])
        assert {"val/exit_1/accuracy", "early_exit/exit_layer/bins"} <= run["history"]


def test_optuna_sweep_optimises_the_validation_metric(glue_dir, tmp_path):
    sweep = tmp_path / "optuna"
    proc = multirun(sweep, "hparams_search=romebert_optuna", "hydra.sweeper.n_trials=2", "backbone=tiny",
                    f"data_dir={glue_dir}", "debug=limit", "eval.after_train=false", "logger=none")
    assert proc.returncode == 0, proc.stderr[-3000:]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["completed"] == 2
    assert set(best["best_params"]) == {"model.optimizer.lr", "model.gamma", "model.temperature"}
    values = {}
    for i in (0, 1):
        overrides = yaml.safe_load((sweep / str(i) / ".hydra" / "overrides.yaml").read_text())
        assert any(o.startswith("model.gamma=") for o in overrides)
        values[i] = results(sweep / str(i))["objective"]["val/accuracy"]
    assert best["best_value"] == pytest.approx(max(values.values()))


def test_torchrun_starts_the_ranks_and_they_share_one_run_folder(glue_dir, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "run.py",
           "trainer=ddp_cpu", "backbone=tiny", "model=romebert", f"data_dir={glue_dir}", "debug=limit",
           "eval.after_train=false",
           f"paths.log_dir={tmp_path}", "logger=none"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (folder,) = (tmp_path / "sst2" / "romebert").iterdir()
    assert folder.name.startswith("torchrun-") and "test/accuracy" in results(folder)["test"]


def test_slurm_launcher_follows_the_trainer(tmp_path):
    cfg = make_config(["hydra/launcher=slurm", "trainer=slurm", "trainer.num_nodes=2", "trainer.devices=4",
                       "backbone=tiny"], tmp_path)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
    assert launcher.max_num_timeout > 0  # requeued after a timeout, resuming with ckpt_path=auto
    (plugin,) = cfg.trainer.plugins
    assert plugin._target_.endswith("SLURMEnvironment") and plugin.auto_requeue is False


def test_ckpt_path_auto_resumes_in_the_run_folder(glue_dir, tmp_path):
    common = [f"data_dir={glue_dir}", "model=bert", "data.batch_size=16", "data.train_limit=null", "test=false",
              "ckpt_path=auto", "logger=none"]
    first = run_cli(tmp_path / "run", *common, "trainer.max_epochs=1")
    assert "starting afresh" in first.stdout + first.stderr
    run_cli(tmp_path / "run", *common, "trainer.max_epochs=2")  # a requeued job: same folder, longer budget
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 8  # 4 steps an epoch: the first 4 not redone
    assert ckpt["lr_schedulers"][0]["last_epoch"] == 8
